"""Dropout masks for every run of an ensemble in one draw: a counter-based hash on the device, per-run reproducible.

Run r's mask at training step s, hidden layer l, element (i, j) is a function of (its seed, s, l, i, j) alone,
so it is the same whichever runs share the ensemble, and a whole step's masks are a fixed handful of int32
operations on (R, layers, rows x width) tensors, with no generator state (capturable, compilable). The hash is
lowbias32 (Chris Wellons' hash prospector) in int32 arithmetic: multiplications wrap around, two's complement,
on the CPU and CUDA alike, and each right shift is made logical by a mask (>> on int32 is arithmetic).
tests/test_step.py checks it against a numpy uint32 implementation, the masks' Bernoulli rate and the absence
of correlation between neighbouring units, rows, layers, steps and runs.
"""

from __future__ import annotations

import torch

_LOWBIAS32 = (0x7FEB352D, 0x846CA68B - (1 << 32))  # lowbias32's multipliers, as int32
_GOLDEN = 0x9E3779B9 - (1 << 32)  # 2^32 / golden ratio, odd, as int32: spreads a counter over all 32 bits
_MASK64 = (1 << 64) - 1


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32, a bijective 32-bit integer hash, on an int32 tensor."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _LOWBIAS32[0]
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _LOWBIAS32[1]
    return x ^ ((x >> 16) & 0xFFFF)


def cell_hash(x: torch.Tensor) -> torch.Tensor:
    """The per-element hash, lowbias32 without its two outer xorshifts (six operations fewer per element of
    the largest tensors a step builds): its input is a well-mixed key plus a small counter, whose high bits
    are random already, and the threshold on the signed result reads its high bits (the last xorshift only
    changes the low ones)."""
    x = x * _LOWBIAS32[0]
    x = x ^ ((x >> 15) & 0x1FFFF)
    return x * _LOWBIAS32[1]


def keys(seeds: list[int]) -> list[int]:
    """Each run's key, from its seed alone: splitmix64 of the seed, its low 32 bits as a signed int."""
    out = []
    for seed in seeds:
        z = (seed + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        low = (z ^ (z >> 31)) & 0xFFFFFFFF
        out.append(low - (1 << 32) if low >= 1 << 31 else low)
    return out


def noise(run_keys: torch.Tensor, step: torch.Tensor, depth: int, rows: int, width: int, p: float) -> list:
    """Per hidden layer the dropout multipliers (R, rows, width), 0 or 1 / (1 - p), of every run at ``step``
    (a 0-d int64 tensor on the device of ``run_keys``, (R,) int32).

    Element (i, j) of run r in layer l is kept when the hash of (its key, step, l, i, j) is at least a
    threshold, with probability 1 - p (to 2^-32): the key of (run, step, layer) is mix32 of the run's key xor
    the step-and-layer counter (times an odd constant), and each element hashes that key plus i * width + j.
    """
    counter = (step * depth + torch.arange(depth, device=run_keys.device)).to(torch.int32) * _GOLDEN
    layer_keys = mix32(counter[None, :] ^ run_keys[:, None])  # (R, depth)
    cells = torch.arange(rows * width, dtype=torch.int32, device=run_keys.device)
    threshold = min(max(round(p * 2 ** 32) - 2 ** 31, -2 ** 31), 2 ** 31 - 1)  # uniform int32 >= threshold: 1 - p
    keep = cell_hash(cells[None, None, :] + layer_keys[:, :, None]) >= threshold  # every layer at once
    multipliers = keep.to(torch.float32).mul_(1 / (1 - p)).view(len(run_keys), depth, rows, width)
    return [multipliers[:, i] for i in range(depth)]


def mask(seed: int, step: int, layer: int, depth: int, rows: int, width: int, p: float) -> torch.Tensor:
    """The dropout multipliers (rows, width) of the run with this seed at training step ``step`` (1-based,
    counted over the whole training) in hidden layer ``layer`` of ``depth``, for a batch of ``rows``: those
    its ensemble's step uses, whatever the ensemble (CPU)."""
    return noise(torch.tensor(keys([seed]), dtype=torch.int32), torch.tensor(step), depth, rows, width, p)[layer][0]
