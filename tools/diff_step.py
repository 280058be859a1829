"""Diff one step of an artifact: the VM (torch on the GPU) against the megakernel, buffer by buffer.

Run on an H100/H200 from the repository root:

    python tools/diff_step.py ARTIFACT [--step 8] [--prompt-ids 1,2,...] [--context 300]
                              [--stop-after N | --bisect] [--tol 1e-4]

Both sides start from identical state (zero KV caches, or `--context N` random ones drawn by the
runtime and copied into the VM) and run the same step: the whole step, or with `--stop-after N`
only the tasks with id <= N (MegakernelRuntime.step(stop_after=N) against tilert.diff.vm_prefix).
Every global buffer (activations, inputs, outputs, KV caches) is compared; activations are
poisoned first, so a buffer the kernel never wrote shows.  `--bisect` finds the first task after
which some buffer differs (about log2(tasks) prefix runs).  Exit status 0: identical within
--tol; 1: a difference (printed); 2: a usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.weights import StoredTensor
from tilert.errors import UserError


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--prompt-ids {text!r}: expected comma-separated integers") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--step", type=int, default=1, help="step size B (default 1)")
    ap.add_argument("--prompt-ids", help="the B token ids of the step (default: a fixed list)")
    ap.add_argument("--context", type=int, default=0, help="positions already in the KV caches (random)")
    ap.add_argument("--stop-after", type=int, metavar="N", help="compare after the tasks with id <= N")
    ap.add_argument("--bisect", action="store_true", help="find the first task whose output differs")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-4, help="relative (norm) tolerance per buffer")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except UserError as e:
        print(f"diff_step: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from tilert.artifact import load_kernels, read_artifact
    from tilert.diff import first_divergence, prefix_differs
    from tilert.gpu import MegakernelRuntime
    from tilert.megakernel import check_device
    from tilert.vm import VM

    check_device(read_artifact(args.artifact, load_weights=False, steps=[1]))
    art = read_artifact(args.artifact, load_weights=True)
    B = args.step
    if B not in art.schedules:
        raise UserError(f"--step {B}: the artifact has steps {sorted(art.schedules)}")
    tokens = _ints(args.prompt_ids) if args.prompt_ids else [(7 + 31 * i) % art.cfg.vocab_size for i in range(B)]
    if len(tokens) != B:
        raise UserError(f"--prompt-ids: {len(tokens)} ids for a step of {B}")
    if args.context + B > art.max_seq_len:
        raise UserError(f"--context {args.context} + {B} exceeds the max sequence length {art.max_seq_len}")
    n_tasks = len(art.schedules[B].graph.tasks)
    if args.stop_after is not None and not 0 <= args.stop_after < n_tasks:
        raise UserError(f"--stop-after {args.stop_after}: the {B}-token step has tasks 0..{n_tasks - 1}")

    kernels = load_kernels(art)
    # The weights on the GPU once: the runtime's padded copies, which the VM reads through views.
    weights = {n: StoredTensor(t.fmt, tuple(t.shape), t.data.cuda(), None if t.scale is None else t.scale.cuda())
               for n, t in art.weights.items() if not n.startswith("draft.")}
    art.weights = None
    rt = MegakernelRuntime({b: p for b, (p, _) in kernels.items()}, {b: g for b, (_, g) in kernels.items()},
                           weights, art.max_seq_len)
    vm = VM(art.cfg, art.schedules, weights, art.max_seq_len, device="cuda")
    if args.context:
        rt.fill_cache(args.context, seed=args.seed)
        for name in vm.state:
            vm.state[name].copy_(rt.buffer(name, B))
    vm.truncate(args.context)
    rt.seq_len = args.context
    names = rt.kernels[B].gen.task_names

    if args.bisect:
        problem = first_divergence(rt, vm, tokens, linear_limit=0, temperature=args.temperature, seed=args.seed,
                                   tol=args.tol)
        if problem is None:
            print(f"B={B}: all {n_tasks} tasks agree with the VM (tol {args.tol})")
            return 0
        print(f"B={B}: first divergence {problem}")
        return 1
    last = n_tasks - 1 if args.stop_after is None else args.stop_after
    snapshot = {k: v.clone() for k, v in vm.state.items()}
    bad = prefix_differs(rt, vm, tokens, last, snapshot, args.temperature, args.seed, args.tol)
    where = "the whole step" if last == n_tasks - 1 else f"task {last} {names[last]}"
    n_buf = len(rt.kernels[B].gen.buffers)
    if not bad:
        print(f"B={B}: after {where}, all {n_buf} global buffers agree with the VM (tol {args.tol})")
        return 0
    print(f"B={B}: after {where}, {len(bad)} of {n_buf} global buffers differ:")
    for line in bad:
        print(f"  {line}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
