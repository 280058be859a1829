"""What each task kind computes, in PyTorch: the semantics the VM executes and the GPU kernel
must reproduce.  One function per base kind; a fused task runs its stages in order.

Every function touches only the regions its task declares.  Activations are float32; weights
are dequantized tile by tile from the precision the artifact stores.
"""

from __future__ import annotations

import math

import torch

from model.weights import StoredTensor
from tilert import sampling


class Memory:
    """Global buffers (torch tensors) and weights (StoredTensor) by buffer name, plus an
    overlay of task-local buffers while a fused task runs."""

    def __init__(self, buffers: dict[str, torch.Tensor], weights: dict[str, StoredTensor],
                 device: str | torch.device = "cpu"):
        self.buffers = buffers
        self.device = torch.device(device)
        self.weights = weights
        self.local: dict[str, torch.Tensor] = {}
        self._tiles: dict[tuple, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.local[name] if name in self.local else self.buffers[name]

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Dequantized rows of a weight (cached: the VM replays the same tiles every step)."""
        key = (name, r0, r1)
        if key not in self._tiles:
            self._tiles[key] = self.weights[name].rows(r0, r1).to(self.device)
        return self._tiles[key]

    def expert_rows(self, name: str, expert: int, r0: int, r1: int) -> torch.Tensor:
        key = (name, expert, r0, r1)
        if key not in self._tiles:
            st = self.weights[name]
            one = StoredTensor(st.fmt, st.shape[1:], st.data[expert],
                               None if st.scale is None else st.scale[expert])
            self._tiles[key] = one.rows(r0, r1).to(self.device)
        return self._tiles[key]

    def vector(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self.weights[name].shape[0])


def embed(p, m: Memory):
    c0, c1 = p["cols"]
    tokens = m["tokens"].long()
    for b, tok in enumerate(tokens.tolist()):
        m["x"][b, c0:c1] = m.rows("model.embed_tokens.weight", tok, tok + 1)[0, c0:c1]


def rmsnorm(p, m: Memory):
    x = m[p["in"]]
    w = m.vector(p["weight"])
    eps = p.get("eps", 1e-5)
    m[p["out"]].copy_(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w)


def linear(p, m: Memory):
    x = m[p["in"]]
    for s in p["segments"]:
        w = m.rows(s["weight"], *s["rows"])
        c0, c1 = s["cols"]
        y = x @ w.T
        out = m[s["out"]]
        if p["accumulate"]:
            out[:, c0:c1] += y
        else:
            out[:, c0:c1] = y


def rope(p, m: Memory):
    buf, hd, rdim = m[p["buf"]], p["head_dim"], p["rotary_dim"]
    c0 = p["head"] * hd
    # "positions" names another position buffer where one graph rotates rows at two sets of
    # positions (the DFlash draft step: new context rows and the block; tilert/draft.py).
    pos = m[p.get("positions", "positions")].to(buf.device, torch.float32)
    inv_freq = 1.0 / (p["theta"] ** (torch.arange(0, rdim, 2, dtype=torch.float32, device=buf.device) / rdim))
    ang = pos[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x = buf[:, c0:c0 + rdim].clone()
    half = rdim // 2
    rot = torch.cat([-x[:, half:], x[:, :half]], -1)
    buf[:, c0:c0 + rdim] = x * cos + rot * sin


def _slot(position: int, p) -> int:
    """Cache slot of a key position: sliding-window layers keep a ring."""
    return position % p["slots"] if p.get("ring") or p.get("window") else position


def kv_write(p, m: Memory):
    """Rows at a negative position are padding (a draft step's unused context rows): not written.
    "k", "v" and "positions" may name other buffers (the draft step's context path)."""
    g = p["head"]
    kc, vc = m[p["k_cache"]], m[p["v_cache"]]
    hd, vd = kc.shape[-1], vc.shape[-1]
    k, v = m[p.get("k", "k")], m[p.get("v", "v")]
    for b, position in enumerate(m[p.get("positions", "positions")].tolist()):
        if position < 0:
            continue
        s = _slot(position, p)
        kc[s, g] = k[b, g * hd:(g + 1) * hd]
        vc[s, g] = v[b, g * vd:(g + 1) * vd] * p["value_scale"]


def visible_keys(position: int, window: int) -> tuple[int, int]:
    """Positions [lo, hi] a query at `position` attends to (the window counts the query)."""
    return (max(0, position - window + 1) if window else 0), position


def split_range(positions: list[int], window: int, split: int, splits: int) -> tuple[int, int]:
    """Key positions [lo, hi) of one split: the step's whole visible range cut in equal parts."""
    lo = visible_keys(positions[0], window)[0]
    hi = positions[-1] + 1
    chunk = -(-(hi - lo) // splits)
    return lo + split * chunk, min(hi, lo + (split + 1) * chunk)


def attention(p, m: Memory):
    """Causal by default.  `"causal": false` (a DFlash draft block, model/dflash.py) lets every
    query of the step see every key of the step too: the visible range of a query then ends at
    the step's last position instead of its own."""
    g, group, s = p["kv_head"], p["group"], p["split"]
    kc, vc = m[p["k_cache"]], m[p["v_cache"]]
    hd = kc.shape[-1]
    q = m["q"]
    positions = m["positions"].tolist()
    s_lo, s_hi = split_range(positions, p["window"], s, p["splits"])
    h0 = g * group
    causal = p.get("causal", True)
    for b, position in enumerate(positions):
        lo, hi = visible_keys(position, p["window"])
        if not causal:
            hi = positions[-1]
        lo, hi = max(lo, s_lo), min(hi + 1, s_hi)
        heads = slice(h0, h0 + group)
        if hi <= lo:
            m["attn_max"][b, heads, s] = -math.inf
            m["attn_sum"][b, heads, s] = 0.0
            m["attn_acc"][b, heads, s] = 0.0
            continue
        slots = torch.tensor([_slot(t, p) for t in range(lo, hi)], device=kc.device)
        keys, values = kc[slots, g], vc[slots, g]  # [n, hd], [n, vd]
        qh = q[b, h0 * hd:(h0 + group) * hd].view(group, hd)
        scores = (qh @ keys.T) * p["scale"]  # [group, n]
        mx = scores.max(-1).values
        e = torch.exp(scores - mx[:, None])
        m["attn_max"][b, heads, s] = mx
        m["attn_sum"][b, heads, s] = e.sum(-1)
        m["attn_acc"][b, heads, s] = e @ values


def attn_combine(p, m: Memory):
    h0, h1 = p["heads"]
    n = p["splits"]
    mx, sm, acc = m["attn_max"][:, h0:h1, :n], m["attn_sum"][:, h0:h1, :n], m["attn_acc"][:, h0:h1, :n]
    top = mx.max(-1).values  # [B, heads]
    if p["sink"]:
        sink = m.vector(p["sink"])[h0:h1][None, :].expand_as(top)
        top = torch.maximum(top, sink)
    scale = torch.exp(mx - top[..., None])  # exp(-inf) = 0 for empty splits
    denom = (sm * scale).sum(-1)
    if p["sink"]:
        denom = denom + torch.exp(sink - top)
    out = (acc * scale[..., None]).sum(-2) / denom[..., None]  # [B, heads, vd]
    vd = out.shape[-1]
    m["attn_out"][:, h0 * vd:h1 * vd] = out.reshape(out.shape[0], -1)


def gate_up(p, m: Memory):
    x = m[p["in"]]
    r0, r1 = p["rows"]
    g = x @ m.rows(p["gate"], r0, r1).T
    u = x @ m.rows(p["up"], r0, r1).T
    m[p["out"]][:, r0:r1] = torch.nn.functional.silu(g) * u


def router(p, m: Memory):
    e0, e1 = p["rows"]
    m["router_logits"][:, e0:e1] = m[p["in"]] @ m.rows(p["weight"], e0, e1).T


def topk(p, m: Memory):
    scores = torch.sigmoid(m["router_logits"])
    choice = scores + m.vector(p["bias"])[None, :]
    idx = torch.topk(choice, p["k"], dim=-1).indices
    w = scores.gather(1, idx)
    if p["norm"]:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    m["topk_idx"].copy_(idx.to(m["topk_idx"].dtype))
    m["topk_weight"].copy_(w * p["scale"])


def _local_expert(p, e: int) -> int | None:
    """Where expert e sits in this GPU's expert stacks, or None when another GPU owns it.
    Multi-GPU tasks carry `experts` = [e0, e1), the block this rank holds (tilert/partition.py);
    on one GPU the stacks hold every expert."""
    if "experts" not in p:
        return e
    e0, e1 = p["experts"]
    return e - e0 if e0 <= e < e1 else None


def _residual_out(p, m: Memory) -> tuple[torch.Tensor, bool]:
    """Where a residual update goes: added into x, or (multi-GPU) written as this rank's
    partial sum for the all-reduce to add up (params `out`, `accumulate`)."""
    return m[p.get("out", "x")], p.get("accumulate", True)


def expert_gate_up(p, m: Memory):
    t, slot = p["token"], p["slot"]
    r0, r1 = p["rows"]
    e = _local_expert(p, int(m["topk_idx"][t, slot]))
    if e is None:
        return  # another rank's expert: this rank's expert_down skips the slot
    x = m[p["in"]][t]
    g = m.expert_rows(p["gate"], e, r0, r1) @ x
    u = m.expert_rows(p["up"], e, r0, r1) @ x
    m["moe_act"][t, slot, r0:r1] = torch.nn.functional.silu(g) * u


def expert_down(p, m: Memory):
    r0, r1 = p["rows"]
    act, idx, w = m["moe_act"], m["topk_idx"], m["topk_weight"]
    out, accumulate = _residual_out(p, m)
    for t in range(act.shape[0]):
        total = torch.zeros(r1 - r0, device=act.device)
        for slot in range(p["k"]):
            e = _local_expert(p, int(idx[t, slot]))
            if e is not None:
                total += w[t, slot] * (m.expert_rows(p["down"], e, r0, r1) @ act[t, slot])
        if accumulate:
            out[t, r0:r1] += total
        else:
            out[t, r0:r1] = total


def lm_head(p, m: Memory):
    r0, r1 = p["rows"]
    w0 = p.get("weight_row0", 0)  # multi-GPU: the rank's LM-head slice starts at vocabulary row w0
    y = m[p["in"]] @ m.rows(p["weight"], r0 - w0, r1 - w0).T
    m["logits"][:, r0:r1] = y
    temperature, seed = float(m["sampling"][0]), int(m["sampling"][1])
    for b, position in enumerate(m["positions"].tolist()):
        score = sampling.perturbed(y[b].cpu(), r0, temperature, seed, position)
        i = int(torch.argmax(score))
        m["best_partial"][b, p["tile"], 0] = score[i]
        m["best_partial"][b, p["tile"], 1] = r0 + i


def argmax(p, m: Memory):
    best = m["best_partial"]
    for b in range(best.shape[0]):
        # Highest score; among equal scores the lowest vocabulary index (tiles are in order).
        i = int(torch.argmax(best[b, :, 0]))
        m["next_token"][b] = int(best[b, i, 1])


def expert_union(p, m: Memory):
    """The distinct experts of the step in first-seen order (token-major), and for every
    (token, k) the slot of its expert in that list; unused slots hold -1."""
    idx = m["topk_idx"].tolist()
    union, route = [], []
    for row in idx:
        route.append([])
        for e in row:
            if e not in union:
                union.append(e)
            route[-1].append(union.index(e))
    m["moe_union"].fill_(-1)
    m["moe_union"][:len(union)] = torch.tensor(union, device=m["moe_union"].device)
    m["moe_route"].copy_(torch.tensor(route, device=m["moe_route"].device))


def expert_gate_up_union(p, m: Memory):
    u = p["slot"]
    r0, r1 = p["rows"]
    out = m["moe_act_union"][u, :, r0:r1]
    out.zero_()  # tokens not routed to this expert: defined zeros, never read
    e = int(m["moe_union"][u])
    if e < 0 or _local_expert(p, e) is None:
        return
    e = _local_expert(p, e)
    tokens = sorted({t for t, row in enumerate(m["moe_route"].tolist()) if u in row})
    x = m[p["in"]][tokens]
    g = x @ m.expert_rows(p["gate"], e, r0, r1).T  # the expert's tile is read once for all its tokens
    up = x @ m.expert_rows(p["up"], e, r0, r1).T
    out[tokens] = torch.nn.functional.silu(g) * up


def expert_down_union(p, m: Memory):
    r0, r1 = p["rows"]
    act, union, w = m["moe_act_union"], m["moe_union"].tolist(), m["topk_weight"]
    route = m["moe_route"].tolist()
    out, accumulate = _residual_out(p, m)
    local = {u: _local_expert(p, e) for u, e in enumerate(union) if e >= 0}
    # One read of each distinct expert's tile for all its tokens ...
    y = {u: act[u] @ m.expert_rows(p["down"], e, r0, r1).T for u, e in local.items() if e is not None}
    # ... then each token's weighted sum in the union's slot order (the GPU kernel adds each
    # slot's tile as it streams in; a token's experts are distinct, so each slot once).
    for t, row in enumerate(route):
        total = torch.zeros(r1 - r0, device=act.device)
        for u in sorted(set(row)):
            if u in y:
                total += w[t, row.index(u)] * y[u][t]
        if accumulate:
            out[t, r0:r1] += total
        else:
            out[t, r0:r1] = total


def capture(p, m: Memory):
    """Columns [c0, c1) of the residual stream after a target layer, copied into slot `slot` of
    the `hidden` output [B, len(target_layers) * H]: the hidden states a DFlash drafter is
    conditioned on (ReferenceDecoder.forward(capture_layers=...), concatenated in the order of
    DFlashConfig.target_layers as DFlashDrafter.append_context does)."""
    c0, c1 = p["cols"]
    x = m["x"]
    off = p["slot"] * x.shape[1]
    m["hidden"][:, off + c0:off + c1] = x[:, c0:c1]


def draft_embed(p, m: Memory):
    """Columns [c0, c1) of a DFlash draft block's input: the last committed token's embedding
    (the target's embed_tokens) in row 0, the drafter's mask embedding in rows 1..B-1
    (DFlashDrafter.draft_logits)."""
    c0, c1 = p["cols"]
    tok = int(m["tokens"][0])
    m["x"][0, c0:c1] = m.rows(p["embed"], tok, tok + 1)[0, c0:c1]
    m["x"][1:, c0:c1] = m.vector(p["mask"])[c0:c1]


KERNELS = {
    "embed": embed, "rmsnorm": rmsnorm, "linear": linear, "rope": rope, "kv_write": kv_write,
    "attention": attention, "attn_combine": attn_combine, "gate_up": gate_up, "router": router,
    "topk": topk, "expert_gate_up": expert_gate_up, "expert_down": expert_down,
    "lm_head": lm_head, "argmax": argmax, "expert_union": expert_union,
    "expert_gate_up_union": expert_gate_up_union, "expert_down_union": expert_down_union,
    # Speculative decoding (DFlash): tilert/draft.py.
    "capture": capture, "draft_embed": draft_embed,
}


def run_task(task, m: Memory, local_shapes: dict[str, tuple[int, ...]]) -> None:
    """Execute one task (a fused one stage by stage, its local buffers private to it)."""
    if not task.stages:
        KERNELS[task.kind](task.params, m)
        return
    # Poisoned: a stage that reads what no earlier stage wrote yields NaN, which never passes.
    m.local = {name: torch.full(local_shapes[name], math.nan, device=m.device) for name in task.local}
    try:
        for stage in task.stages:
            KERNELS[stage.kind](stage.params, m)
    finally:
        m.local = {}
