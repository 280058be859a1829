"""Token choice shared by every backend: greedy argmax, or Gumbel-max sampling.

Sampling with temperature T draws argmax(logits / T + g) with g ~ Gumbel(0, 1), which is an
exact sample of softmax(logits / T).  The noise g comes from a counter-based hash of
(seed, position, vocabulary index), so any backend, and any tiling of the vocabulary over
tasks, draws the same token: a tile computes its own noise and its own (max, argmax), and the
tiles are reduced by the lowest index among equal maxima.
"""

from __future__ import annotations

import numpy as np
import torch

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def uniform(seed: int, position: int, lo: int, hi: int) -> np.ndarray:
    """Uniform (0, 1) float64 numbers for vocabulary indices lo:hi at `position`."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ (np.uint64(position) * _M2))
        idx = np.arange(lo, hi, dtype=np.uint64)
        bits = _splitmix64(key ^ (idx * _GOLDEN))
    # 53 random bits, offset by half a step so that u is never 0 or 1.
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def gumbel(seed: int, position: int, lo: int, hi: int) -> torch.Tensor:
    u = uniform(seed, position, lo, hi)
    return torch.from_numpy(-np.log(-np.log(u)))


def perturbed(logits: torch.Tensor, lo: int, temperature: float, seed: int, position: int) -> torch.Tensor:
    """The scores whose argmax is the chosen token, for logits of vocabulary indices lo:lo+n."""
    logits = logits.to(torch.float64)
    if temperature <= 0.0:
        return logits
    return logits / temperature + gumbel(seed, position, lo, lo + logits.shape[-1])


def choose(logits: torch.Tensor, temperature: float = 0.0, seed: int = 0, position: int = 0) -> int:
    """The token for one row of logits (the full vocabulary)."""
    return int(torch.argmax(perturbed(logits, 0, temperature, seed, position)).item())
