"""Stable seeds and per-item random numbers.

Every random number an item uses is a pure function of (its seed, the attempt, the decoding step), so an
item's text cannot depend on what else is in the batch. Nothing here uses Python's `hash()` (salted per
process) or a generator shared by the batch.

- `derive_seed(job_seed, item_id, sample_index)`: the first 8 bytes (big-endian) of
  sha256("aitextgen-batch/seed/v1|" + json(job_seed) + "|" + json(item_id) + "|" + str(sample_index)),
  masked to 63 bits. `json` is `json.dumps(..., sort_keys=True)`, so the ids `7` and `"7"` differ.
- `sample_seed(seed, k)`: sample 0 of an item uses the item's seed itself; sample k > 0 uses
  `derive_seed(seed, "sample", k)`.
- `uniform(seed, attempt, step)`: splitmix64 applied to the seed, then mixed with the attempt and the step;
  the top 53 bits give a float in [0, 1).

The same draw exists as integer tensor ops (`uniform_tensor`), so the engine computes every row's draw on
its own device without a host round trip; a test checks it equals `uniform` bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import numbers

from ..config import SEED_MAX, check_seed

MASK64 = (1 << 64) - 1


def derive_seed(job_seed: int, item_id, sample_index: int = 0) -> int:
    """The documented, stable seed of (job seed, item id, sample index): same in every process and version."""
    blob = "|".join(
        ["aitextgen-batch/seed/v1", json.dumps(job_seed), json.dumps(item_id, sort_keys=True), str(int(sample_index))]
    )
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big") & SEED_MAX


def sample_seed(seed: int, sample_index: int) -> int:
    """Seed of sample `sample_index` of an item whose seed is `seed` (sample 0 keeps the item's seed).

    Raises:
        UserError: `seed` is not an integer in [0, 2**63-1] (a seed beyond it would wrap onto another one's stream).
    """
    check_seed("seed", int(seed) if isinstance(seed, numbers.Integral) and not isinstance(seed, bool) else seed)
    return int(seed) if sample_index == 0 else derive_seed(int(seed), "sample", sample_index)


def splitmix64(x: int) -> int:
    """One round of splitmix64 (Steele, Lea & Flood 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def stream_key(seed: int, attempt: int = 0) -> int:
    """Key of an item's random stream for one attempt (attempts > 0 re-draw empty outputs)."""
    return splitmix64(splitmix64(int(seed) & MASK64) ^ splitmix64(attempt))


def uniform(key: int, step: int) -> float:
    """The item's uniform draw in [0, 1) at decoding step `step`."""
    return (splitmix64(key ^ splitmix64(step + 0x5EED)) >> 11) * (1.0 / (1 << 53))


# splitmix64's constants as signed 64-bit integers: torch has no uint64 arithmetic, but two's-complement
# addition and multiplication wrap exactly like their unsigned counterparts.
def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def to_signed64(x: int) -> int:
    """An unsigned 64-bit key as the signed int64 that holds the same bits (for tensors)."""
    return _signed(int(x) & MASK64)


def _shift_right(x, k: int):
    """Logical right shift of an int64 tensor (`>>` on int64 is arithmetic: it copies the sign bit)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64_tensor(x):
    """`splitmix64` on an int64 tensor holding 64-bit words (elementwise, any device)."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def uniform_tensor(keys, steps):
    """`uniform(key, step)` for int64 tensors of keys (as `to_signed64`) and steps: float64 draws in [0, 1)."""
    import torch

    mixed = splitmix64_tensor(keys ^ splitmix64_tensor(steps + 0x5EED))
    return _shift_right(mixed, 11).to(torch.float64) * (1.0 / (1 << 53))
