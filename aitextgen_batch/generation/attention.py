"""The engine's attention: grouped query heads over their shared key/value head, and a decode step whose cost
follows the cache positions its rows use.

Registered with transformers' `AttentionInterface` as `ATTENTION` (one function for every architecture that
dispatches through it), with the eager mask builder, so a plain forward pass of the model works too.

Grouped-query attention: query head `h` reads key/value head `h // groups` (the layout `repeat_kv` assumes), so
the queries are viewed as `(batch, kv_heads, groups * queries, head_dim)` and multiplied with the cache as it is:
no key or value is copied, whatever the number of groups.

A decode step (one query per row) attends over the first `mask.shape[-1]` cache positions, a multiple of
`CHUNK[device]`, in chunks of that size, combined with an online softmax in a fixed order:

    m = max(m, max_c(s)); l = l * exp(m_old - m) + sum_c(exp(s - m)); acc = acc * exp(m_old - m) + exp(s - m) @ v_c

Why a row's bits do not depend on how many chunks a step computes (the batch's longest row decides that) or
on the cache's length:
- each chunk's ops have one shape, `(rows, kv_heads, groups, CHUNK)`, whatever the number of chunks, and every
  op is row-wise (fixed shapes make every deterministic kernel row-independent);
- chunks are combined one after the other, first to last, so chunk `c`'s result never depends on a later one;
- a chunk that holds no visible key of a row (it lies past the row's newest key) has scores at the float32
  minimum: `exp(s - m)` is exactly 0 there, `exp(m_old - m)` exactly 1, so the row's `l` and `acc` come out of
  it bit for bit unchanged (`x * 1 + 0 == x`).
So a row gets the same bits from `n` chunks as from the chunks up to its own newest key. A chunk wholly before
a row's first key (left padding, a sliding window) is absorbed the same way once a visible key arrives
(`exp(min - m) == 0` resets what it added), and it is computed for that row in every step alike.

The prefill (many queries, keys of its own width) runs in one grouped pass: its shapes are fixed by
(`prefill_rows`, bucket).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION = "aitextgen_slots"
# Cache positions per attention chunk (part of the numerics: the order in which chunks are combined).
# Small on a CPU, where each position computed costs time; larger on a GPU, where each op costs a launch.
CHUNK = {"cpu": 64, "cuda": 256}


def register() -> None:
    """Make `ATTENTION` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, slot_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)


def slot_attention(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of `query` (batch, heads, queries, head_dim) over `key`/`value` (batch, kv_heads, keys, head_dim).

    Args:
        attention_mask: additive (batch, 1, queries, width) mask, or None (all keys visible). With one query, only
            the first `width` keys are read, in chunks (see the module docstring).
        scaling: multiplier of the scores (default `head_dim ** -0.5`).
        softcap: Gemma 2's `tanh` cap of the scores, or None.

    Returns:
        (batch, queries, heads, head_dim) output, and no attention weights.

    Raises:
        ValueError: attention sinks (`s_aux`), which this function does not implement.
    """
    if kwargs.get("s_aux") is not None:
        raise ValueError("attention sinks (s_aux) are not supported by the batch-invariant engine")
    b, heads, q, d = query.shape
    kv = key.shape[1]
    groups = heads // kv
    scaling = d**-0.5 if scaling is None else scaling
    if q == 1:
        out = _decode(query.reshape(b, kv, groups, d), key, value, attention_mask, scaling, softcap)
    else:
        out = _grouped(query.reshape(b, kv, groups * q, d), key, value, attention_mask, scaling, softcap, groups)
    return out.reshape(b, heads, q, d).transpose(1, 2).contiguous(), None


def _scores(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2)) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    return s


def _grouped(q, key, value, mask, scaling: float, softcap: float | None, groups: int) -> torch.Tensor:
    """One pass over all keys: q (b, kv, groups * queries, d) -> (b, kv, groups * queries, d)."""
    b, kv, gq, d = q.shape
    s = _scores(q, key, scaling, softcap)
    if mask is not None:
        s = (s.view(b, kv, groups, gq // groups, -1) + mask[:, :, None]).view(b, kv, gq, -1)
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(p, value)


def _decode(q, key, value, mask, scaling: float, softcap: float | None) -> torch.Tensor:
    """One query per row over the first `mask.shape[-1]` keys, chunk by chunk: q (b, kv, groups, d)."""
    width = key.shape[2] if mask is None else mask.shape[-1]
    chunk = CHUNK.get(q.device.type, CHUNK["cuda"])
    m = total = acc = None
    for start in range(0, width, chunk):
        end = min(start + chunk, width)
        s = _scores(q, key[:, :, start:end], scaling, softcap).float()
        if mask is not None:
            s = s + mask[:, :, :, start:end].float()  # (b, 1, 1, n) over (b, kv, groups, n)
        top = s.amax(dim=-1, keepdim=True)
        if m is None:
            m = top
            p = torch.exp(s - m)
            total = p.sum(dim=-1, keepdim=True)
            acc = torch.matmul(p.to(value.dtype), value[:, :, start:end]).float()
            continue
        new = torch.maximum(m, top)
        alpha = torch.exp(m - new)
        p = torch.exp(s - new)
        total = total * alpha + p.sum(dim=-1, keepdim=True)
        acc = acc * alpha + torch.matmul(p.to(value.dtype), value[:, :, start:end]).float()
        m = new
    return (acc / total).to(value.dtype)
