"""Token choice on the model's device: the law of `sampling.choose_tokens`, with no host round trip.

`sampling.choose_tokens` (numpy, float64, row by row) stays the reference the tests compare this law
against. Here every operation is a fixed-shape tensor op whose result for a row depends on that row
alone, and none is a floating-point reduction whose order could vary between runs:

- top-k keeps exactly k tokens, ties broken by lower token id: one `topk` over an integer key that
  orders by logit then by id, so the kept set never depends on how a kernel breaks ties;
- probabilities are fixed-point integers, `floor(exp(logit - max) * 2**F)` with `F` chosen so a whole
  vocabulary's sum stays below 2**53: their prefix sums (top-p and the inverse-CDF draw) are integer
  `cumsum`s, exact in any order (a float `cumsum` on CUDA is not deterministic). A token whose
  probability is below 2**-F of the most likely one's (about 1e-11) is never drawn;
- the draw is inverse-CDF in token-id order with the row's own uniform (`seeds.uniform_tensor`).

Parameters are per-row tensors (`RowParams`), so rows with different settings share one block; only
what fixes tensor shapes (`SamplerShape`: how many top-k candidates, whether top-p or the repetition
penalty run at all) is fixed for a block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .params import SamplingParams

# Room for token ids in the low bits of the top-k ordering key (vocabularies up to 2**20 tokens).
ID_BITS = 20


@dataclass(frozen=True)
class SamplerShape:
    """What fixes the sampler's tensor shapes and which stages run (graphs are captured per shape)."""

    vocab: int
    candidates: int  # top-k candidates kept per row; `vocab` when no row uses top-k
    top_p: bool
    penalty: bool

    @classmethod
    def of(cls, params: SamplingParams, vocab: int) -> SamplerShape:
        k = params.top_k if 0 < params.top_k < vocab else vocab
        return cls(vocab, k, params.top_p < 1.0, params.repetition_penalty != 1.0)

    @property
    def fixed_point_bits(self) -> int:
        # Sums of up to `vocab` values <= 2**F must stay exact in float64 (< 2**53) for the threshold compare.
        return 52 - math.ceil(math.log2(self.vocab + 1))


class RowParams:
    """Per-row sampling parameters held as device tensors (`rows` long)."""

    def __init__(self, rows: int, device):
        f64 = dict(dtype=torch.float64, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.temperature = torch.ones(rows, **f64)
        self.top_k = torch.zeros(rows, **i64)
        self.top_p = torch.ones(rows, **f64)
        self.penalty = torch.ones(rows, dtype=torch.float32, device=device)
        self.min_new = torch.zeros(rows, **i64)
        self.max_new = torch.ones(rows, **i64)

    def set_rows(self, rows: torch.Tensor, params: SamplingParams) -> None:
        """Write `params` into the given rows (in place: captured graphs read these tensors)."""
        self.temperature.index_fill_(0, rows, params.temperature)
        self.top_k.index_fill_(0, rows, params.top_k)
        self.top_p.index_fill_(0, rows, params.top_p)
        self.penalty.index_fill_(0, rows, params.repetition_penalty)
        self.min_new.index_fill_(0, rows, params.min_new_tokens)
        self.max_new.index_fill_(0, rows, params.max_new_tokens)


def _order_key(logits: torch.Tensor) -> torch.Tensor:
    """An int64 key per token that sorts like (logit, -token id): larger logit first, then lower id."""
    bits = logits.view(torch.int32)
    # Flip all but the sign bit of negative floats: the int32 patterns then order like the floats.
    monotone = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    ids = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.int64)
    return monotone * (1 << ID_BITS) + ((1 << ID_BITS) - 1 - ids)


def _candidates(lg: torch.Tensor, top_k: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best tokens of each row, in token-id order, and which of them are inside the row's own top_k."""
    key_top = torch.topk(_order_key(lg), k, dim=-1, sorted=True).values  # rank order: best first
    ids = (1 << ID_BITS) - 1 - (key_top & ((1 << ID_BITS) - 1))
    rank = torch.arange(k, device=lg.device)
    row_k = torch.where(top_k > 0, top_k, k).clamp(max=k)
    inside = rank[None, :] < row_k[:, None]
    ids, order = torch.sort(ids, dim=-1)  # token-id order, as `choose_tokens` lists candidates
    return ids, inside.gather(1, order)


def _fixed_point(lg: torch.Tensor, bits: int) -> torch.Tensor:
    """Unnormalised probabilities as integers: floor(exp(lg - max) * 2**bits); -inf gives 0."""
    top = lg.max(dim=-1, keepdim=True).values
    return torch.floor(torch.exp(lg - top) * float(1 << bits)).to(torch.int64)


def _top_p_keep(lg: torch.Tensor, weights: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest prefix (by logit, ties by position) whose mass reaches `top_p`; rows at 1.0 keep all."""
    order = torch.sort(lg, dim=-1, descending=True, stable=True).indices
    w = weights.gather(1, order)
    before = torch.cumsum(w, dim=-1) - w
    keep_sorted = before.to(torch.float64) < top_p[:, None] * w.sum(dim=-1, keepdim=True).to(torch.float64)
    keep = torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)
    return keep | (top_p >= 1.0)[:, None]


def sample(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    p: RowParams,
    shape: SamplerShape,
    steps: torch.Tensor,
    eos_id: int | None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Choose one token per row.

    Args:
        logits: (rows, vocab) next-token logits, any float dtype.
        uniforms: (rows,) float64 draws in [0, 1).
        p: per-row parameters; a row with temperature 0 takes the argmax (lowest id on ties).
        shape: the block's sampler shape.
        steps: (rows,) tokens generated so far (eos is suppressed while below `p.min_new`).
        eos_id: the eos token, or None.
        seen: (rows, vocab) bool, tokens already in the row, when the repetition penalty runs.

    Returns:
        (rows,) int64 token ids.
    """
    lg = logits.to(torch.float32, copy=True)  # a copy: the eos column is written below
    if shape.penalty and seen is not None:
        rp = p.penalty[:, None]
        lg = torch.where(seen, torch.where(lg > 0, lg / rp, lg * rp), lg)
    if eos_id is not None:
        lg[:, eos_id] = torch.where(steps < p.min_new, float("-inf"), lg[:, eos_id])
    greedy = lg.argmax(dim=-1)

    if shape.candidates < shape.vocab:
        ids, inside = _candidates(lg, p.top_k, shape.candidates)
        cand = torch.where(inside, lg.gather(1, ids).to(torch.float64), float("-inf"))
    else:
        ids, cand = None, lg.to(torch.float64)
    hot = p.temperature > 0
    cand = cand / torch.where(hot, p.temperature, 1.0)[:, None]
    weights = _fixed_point(cand, shape.fixed_point_bits)
    if shape.top_p:
        weights = torch.where(_top_p_keep(cand, weights, p.top_p), weights, 0)
    cum = torch.cumsum(weights, dim=-1)
    total = cum[:, -1]
    # floor(u * total) in float64 can round up to `total`: cap it so some token always passes.
    threshold = torch.minimum(torch.floor(uniforms * total.to(torch.float64)).to(torch.int64), total - 1)
    pick = torch.argmax((cum > threshold[:, None]).to(torch.int8), dim=-1)
    drawn = pick if ids is None else ids.gather(1, pick[:, None])[:, 0]
    return torch.where(hot, drawn, greedy)
