"""Diff the megakernel against the VM on identical state, task prefix by task prefix.

Task ids are a valid execution order (every dependency points from a lower id to a higher one),
so "the tasks with id <= N" is a well-defined prefix of a step on both sides: the GPU runs it with
`MegakernelRuntime.step(stop_after=N)`, the VM with `vm_prefix`.  `first_divergence` names the
first task after which some global buffer differs.  Used by tests/test_gpu.py and
tools/diff_step.py; imports no GPU code, so it loads anywhere.
"""

from __future__ import annotations


import torch

from tilert.ir import LOCAL
from tilert.kernels import run_task
from tilert.vm import VM


def vm_prefix(vm: VM, tokens: list[int], last_task: int, temperature=0.0, seed=0):
    """The VM's buffers after the tasks with id <= last_task of one step (id order is a valid
    order: every dependency points from a lower id to a higher one)."""
    s, m = vm.prepare(tokens, temperature, seed)
    local_shapes = {n: b.shape for n, b in s.graph.buffers.items() if b.kind == LOCAL}
    for t in s.graph.tasks[:last_task + 1]:
        run_task(t, m, local_shapes)
    return m.buffers


def compare(rt, vm_bufs, B, tol=1e-4) -> list[str]:
    """Buffers that differ: same NaN (never written) pattern and close finite values."""
    bad = []
    for name in rt.kernels[B].gen.buffers:
        got, ref = rt.read(name, B).double(), vm_bufs[name].detach().cpu().double()
        nan_g, nan_r = torch.isnan(got), torch.isnan(ref)
        if not torch.equal(nan_g, nan_r):
            bad.append(f"{name}: {int((nan_g != nan_r).sum())} entries written on one side only")
            continue
        g, r = got[~nan_g], ref[~nan_r]
        if g.numel() and float((g - r).norm()) > tol * max(float(r.norm()), 1e-30):
            bad.append(f"{name}: rel err {float((g - r).norm() / max(float(r.norm()), 1e-30)):.3g}")
    return bad


def prefix_differs(rt, vm: VM, tokens: list[int], n: int, snapshot: dict, temperature=0.0, seed=0,
                   tol=1e-4) -> list[str]:
    """Restore both sides' KV caches from `snapshot`, run the task prefix <= n on each, and list
    the buffers that differ."""
    B = len(tokens)
    for name, t in snapshot.items():
        vm.state[name].copy_(t)
        rt.write(name, t, B)
    rt.seq_len = vm.seq_len
    rt.step(tokens, temperature, seed, stop_after=n, poison=True)
    return compare(rt, vm_prefix(vm, tokens, n, temperature, seed), B, tol)


def first_divergence(rt, vm: VM, tokens: list[int], linear_limit: int = 400, temperature=0.0, seed=0,
                     tol=1e-4) -> str | None:
    """Run prefixes of one step on the GPU and on the VM from the same KV caches and name the
    first task after which some buffer differs: every prefix for small graphs, a bisection
    (about log2(tasks) runs) for large ones (`linear_limit=0` always bisects)."""
    B = len(tokens)
    n_tasks = len(vm.schedules[B].graph.tasks)
    names = rt.kernels[B].gen.task_names
    snapshot = {k: v.clone() for k, v in vm.state.items()}

    def differs(n: int) -> list[str]:
        return prefix_differs(rt, vm, tokens, n, snapshot, temperature, seed, tol)

    try:
        if n_tasks <= linear_limit:
            for n in range(n_tasks):
                if bad := differs(n):
                    return f"after task {n} {names[n]}: " + "; ".join(bad)
            return None
        if not differs(n_tasks - 1):
            return None
        lo, hi = 0, n_tasks - 1
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if differs(mid) else (mid + 1, hi)
        return f"after task {lo} {names[lo]} (bisected): " + "; ".join(differs(lo))
    finally:
        for name, t in snapshot.items():
            vm.state[name].copy_(t)


def check_step_against_vm(cfg, schedules, weights, rt, context: int, token: int = 11, tol: float = 1e-2,
                          tokens: list[int] | None = None, vm_device: str = "cuda") -> dict:
    """One step at position `context` on the megakernel and on the VM (through torch, on
    `vm_device` with `weights` there) from the same KV caches, over [token] or `tokens`; raises
    unless the logits agree within `tol` (relative) and are finite.  Leaves `rt` at sequence
    length `context` (benchmarks then time that step)."""
    tokens = [token] if tokens is None else list(tokens)
    vm = VM(cfg, schedules, weights, max_seq_len=rt.max_seq_len, device=vm_device)
    for name, t in vm.state.items():
        t.copy_(rt.buffer(name).to(t.dtype))
    vm.seq_len = rt.seq_len
    want, want_tok = vm.step(tokens)
    got, got_tok = rt.step(tokens)
    got = got.float()
    err = float((got - want.to(got.device)).norm() / want.norm())
    if not (bool(torch.isfinite(got).all()) and err < tol):
        raise RuntimeError(f"{type(rt).__name__} differs from the VM: rel err {err:.3e}, tokens {got_tok} vs {want_tok}")
    rt.truncate(context)
    return {"rel_err": err, "token_match": got_tok == want_tok}
