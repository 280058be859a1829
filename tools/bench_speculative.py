"""DFlash speculative decoding on the GPU: plain decode vs draft + verify rounds, with the
draft and verify steps against their bandwidth floors (one process, one GPU).

    python tools/bench_speculative.py --out $OUT/spec.json --log $OUT/spec_log.md

On the carried trained pair (model/pretrained/mimo-tiny-py and its drafter), compiled here with
its megakernels, for each held-out prompt: tokens/s of plain greedy decoding (one B = 1
megakernel launch a token) and of speculative decoding (a draft-step launch and a B = 8 verify
launch a round), both through the same runtime, the tokens checked equal first; the acceptance
length.  Then the median time of a B = 1 step, a B = 8 verify step and a draft step, each
against its floor: the bytes it must move (every weight it reads as stored, the embedding rows
it looks up, the routed experts a step of B tokens selects under uniform routing, the KV read
and written) / the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from model.weights import stored_nbytes  # noqa: E402
from tilert.timing import append_bench_log  # noqa: E402
from tools.bench import copy_bandwidth  # noqa: E402

PRETRAINED = Path(__file__).resolve().parent.parent / "model" / "pretrained" / "mimo-tiny-py"


def expected_distinct(experts: int, k: int, tokens: int) -> float:
    """Distinct experts `tokens` tokens select, k each, under uniform routing."""
    return experts * (1 - (1 - k / experts) ** tokens)


def kernel_floor_bytes(gen, tokens: int, context: int, top_k: int = 0, lookups: int | None = None) -> int:
    """Bytes one step of this kernel must move at `context` positions already cached: weights
    as stored (embedding: `lookups` rows; routed experts: the expected distinct ones), the KV
    caches' visible keys read and the step's entries written."""
    total = 0
    for w in gen.weights:
        shape = tuple(w.shape)
        if w.name == "model.embed_tokens.weight":
            total += (tokens if lookups is None else lookups) * stored_nbytes(w.fmt, shape[1:])
        elif len(shape) == 3:  # routed experts
            total += int(expected_distinct(shape[0], top_k, tokens) * stored_nbytes(w.fmt, shape[1:]) + 0.5)
        else:
            total += stored_nbytes(w.fmt, shape)
    for slot in gen.buffers.values():
        if slot.space == "state":  # [slots, heads, dim] caches, fp32
            slots, heads, dim = slot.shape
            total += (min(context, slots) + tokens) * heads * dim * 4
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--out", default="spec.json")
    ap.add_argument("--log", help="append the tables, with date, device, command and commit, to this file")
    ap.add_argument("--commit", default=os.environ.get("TILERT_COMMIT", "unknown"))
    args = ap.parse_args(argv)

    from tests.test_pretrained import HELDOUT_PROMPTS
    from tilert.artifact import read_artifact
    from tilert.cli import _tokenizer, main as cli_main
    from tilert.spec_backends import MegakernelBackend
    from tilert.speculative import speculative_generate

    art_dir = Path(tempfile.mkdtemp(prefix="tilert-spec-")) / "trained"
    assert cli_main(["compile", "--model", str(PRETRAINED), "--draft", str(PRETRAINED / "draft"),
                     "--out", str(art_dir)]) == 0
    art = read_artifact(art_dir)
    cfg = art.cfg
    tok = _tokenizer(art_dir / "tokenizer.json")
    be = MegakernelBackend.from_artifact(art)
    dev = torch.cuda.get_device_properties(0)
    bw = copy_bandwidth()
    B = be.block_size

    def plain(prompt):
        from tilert.cli import prefill_and_decode

        be.reset()
        return prefill_and_decode(lambda tokens: be.target.step(tokens)[1], prompt, be.step_sizes, args.new_tokens)

    rows = []
    for i, text in enumerate(HELDOUT_PROMPTS):
        prompt = tok.encode(text).ids
        want = plain(prompt)  # warm-up and the reference tokens
        spec = speculative_generate(be, prompt, args.new_tokens)
        if spec.tokens != want:
            raise SystemExit(f"prompt {i}: speculative tokens differ from plain greedy decoding")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        plain(prompt)
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        spec = speculative_generate(be, prompt, args.new_tokens)
        t_spec = time.perf_counter() - t0
        rows.append({"prompt": i, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
                     "plain_tok_s": args.new_tokens / t_plain, "spec_tok_s": args.new_tokens / t_spec,
                     "acceptance_length": spec.acceptance_length, "rounds": spec.rounds})
        print(json.dumps(rows[-1]), flush=True)

    # Step times against their floors, at the context the last run reached (the oracle tool's
    # step_times: each target step first run at that context, since launch() repeats a kernel's
    # last step; the timing resets the backend, so it comes last).
    from tools.bench_dflash_oracle import step_times

    context = be.seq_len
    gens = {"target B=1": be.target.kernels[1].gen, f"verify B={B}": be.target.kernels[B].gen,
            f"draft B={B}": be.drafter.rt.kernels[B].gen}
    steps = step_times(be, gens, context, args.reps, bw, cfg.num_experts_per_tok)
    result = {"device": dev.name, "copy_bandwidth": bw, "date": time.strftime("%Y-%m-%d"), "rows": rows,
              "steps": steps, "context": context, "argv": sys.argv}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    if args.log:
        append_bench_log(args.log, f"{result['date']}: DFlash on the GPU, trained tiny pair (mimo-tiny-py)", dev.name,
                         args.commit, "tools/bench_speculative.py", table(result))
    return 0


def table(result) -> str:
    lines = [f"device {result['device']}, copy bandwidth {result['copy_bandwidth'] / 1e12:.2f} TB/s",
             "| prompt | prompt tokens | new tokens | plain tok/s | DFlash tok/s | speedup | acceptance length |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['prompt']} | {r['prompt_tokens']} | {r['new_tokens']} | {r['plain_tok_s']:.0f} | "
                     f"{r['spec_tok_s']:.0f} | {r['spec_tok_s'] / r['plain_tok_s']:.2f} | {r['acceptance_length']:.2f} |")
    lines += ["", f"step times at context {result['context']} (median of launches) vs floor (bytes / copy bandwidth):",
              "| step | us | floor us | step / floor |", "|---|---|---|---|"]
    for name, s in result["steps"].items():
        lines.append(f"| {name} | {s['seconds'] * 1e6:.1f} | {s['floor_s'] * 1e6:.2f} | {s['ratio']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
