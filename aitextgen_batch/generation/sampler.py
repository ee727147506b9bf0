"""Token choice on the model's device: the law of `reference_sampler.choose_tokens`, with no host round trip.

`reference_sampler.choose_tokens` (numpy, float64, row by row) stays the reference the tests compare this law
against. Here every operation is a fixed-shape tensor op whose result for a row depends on that row
alone, and none is a floating-point reduction whose order could vary between runs:

- top-k keeps exactly k tokens, ties broken by lower token id (the k-th value is unambiguous; tokens
  equal to it are ranked by id), so the kept set never depends on how a kernel breaks ties;
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

from .params import MAX_STOP_TOKEN_IDS, SamplingParams


@dataclass(frozen=True)
class SamplerShape:
    """What fixes the sampler's tensor shapes and which stages run (graphs are captured per shape)."""

    vocab: int
    candidates: int  # top-k candidates kept per row; `vocab` when no row uses top-k
    top_p: bool
    penalty: bool
    constrained: bool = False  # rows with a structured-output constraint (a host-computed token mask per step)
    top_logprobs: int = 0  # the K most likely tokens recorded at each step

    @classmethod
    def of(cls, params: SamplingParams, vocab: int) -> SamplerShape:
        k = params.top_k if 0 < params.top_k < vocab else vocab
        return cls(
            vocab,
            k,
            params.top_p < 1.0,
            params.repetition_penalty != 1.0,
            params.constraint is not None,
            min(params.top_logprobs, vocab),
        )

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
        # The row's own stop token ids (rows, 16), padded by repeating its first, and whether the row has any (a row
        # without holds `pad_stop` everywhere, marked not real).
        self.stop_ids = torch.zeros((rows, MAX_STOP_TOKEN_IDS), **i64)
        self.stop_valid = torch.zeros((rows, MAX_STOP_TOKEN_IDS), dtype=torch.bool, device=device)
        self.pad_stop = 0

    def set_rows(self, rows: torch.Tensor, params: SamplingParams) -> None:
        """Write `params` into the given rows (in place: captured graphs read these tensors)."""
        self.temperature.index_fill_(0, rows, params.temperature)
        self.top_k.index_fill_(0, rows, params.top_k)
        self.top_p.index_fill_(0, rows, params.top_p)
        self.penalty.index_fill_(0, rows, params.repetition_penalty)
        self.min_new.index_fill_(0, rows, params.min_new_tokens)
        self.max_new.index_fill_(0, rows, params.max_new_tokens)
        ids = list(params.stop_token_ids)
        valid = [bool(ids)] * MAX_STOP_TOKEN_IDS  # padding copies the first id, so it is as real as that one
        ids = ids + [ids[0] if ids else self.pad_stop] * (MAX_STOP_TOKEN_IDS - len(ids))
        n = len(rows)
        self.stop_ids.index_copy_(0, rows, torch.tensor([ids] * n, dtype=torch.int64).to(rows.device))
        self.stop_valid.index_copy_(0, rows, torch.tensor([valid] * n, dtype=torch.bool).to(rows.device))


def _candidates(lg: torch.Tensor, top_k: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best tokens of each row in token-id order, and which of them are inside the row's own top_k.

    Ties are broken by lower token id wherever a kernel would be free to choose: the k-th value is
    unambiguous, every token above it is kept, and tokens equal to it are ranked by id.
    """
    values = torch.topk(lg, k, dim=-1, sorted=True).values  # best first
    kth = values[:, -1:]
    vocab = lg.shape[-1]
    ids = torch.arange(vocab, device=lg.device, dtype=torch.int32)
    # Above the k-th value first (any order), then the ties by lower id; the rest never reach the top k.
    score = torch.where(lg > kth, 2 * vocab - ids, torch.where(lg == kth, vocab - ids, -1))
    ids = torch.sort(torch.topk(score, k, dim=-1).indices, dim=-1).values  # token-id order
    cand = lg.gather(1, ids)
    # A row whose own top_k is smaller keeps the tokens above its own k-th value, then ties by id.
    row_k = torch.where(top_k > 0, top_k, k).clamp(max=k)
    row_kth = values.gather(1, (row_k - 1)[:, None])
    above, tie = cand > row_kth, cand == row_kth
    need = row_k[:, None] - above.sum(dim=-1, keepdim=True)
    return ids, cand, above | (tie & (torch.cumsum(tie.to(torch.int32), dim=-1) <= need))


def top_tokens(lg: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row, best first, ties by lower token id: (ids (rows, k), values (rows, k)).

    Which of several tokens tied at the k-th value are kept, and their order, never depend on a kernel's choice."""
    ids, values, _ = _candidates(lg, torch.zeros(lg.shape[0], dtype=torch.int64, device=lg.device), k)
    order = torch.sort(values, dim=-1, descending=True, stable=True).indices  # ids ascending within equal values
    return ids.gather(1, order).to(torch.int64), values.gather(1, order)


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
    eos_ids: torch.Tensor,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """Choose one token per row.

    Args:
        logits: (rows, vocab) next-token logits, any float dtype.
        uniforms: (rows,) float64 draws in [0, 1).
        p: per-row parameters; a row with temperature 0 takes the argmax (lowest id on ties).
        shape: the block's sampler shape.
        steps: (rows,) tokens generated so far (eos is suppressed while below `p.min_new`).
        eos_ids: (n,) the model's eos ids (maybe none); with each row's `p.stop_ids`, they are suppressed while the
            row is below `p.min_new` tokens.
        seen: (rows, vocab) bool, tokens already in the row, when the repetition penalty runs.

    Returns:
        (rows,) int64 token ids.
    """
    lg = logits.to(torch.float32, copy=True)  # a copy: the eos column is written below
    if shape.penalty and seen is not None:
        rp = p.penalty[:, None]
        lg = torch.where(seen, torch.where(lg > 0, lg / rp, lg * rp), lg)
    early = (steps < p.min_new)[:, None]
    if eos_ids.numel():
        lg[:, eos_ids] = torch.where(early, float("-inf"), lg[:, eos_ids])
    # A row's columns are its ids (padding repeats one) or, without any, one column written back as read: duplicate
    # columns always receive the same value.
    lg.scatter_(1, p.stop_ids, torch.where(early & p.stop_valid, float("-inf"), lg.gather(1, p.stop_ids)))
    greedy = lg.argmax(dim=-1)

    if shape.candidates < shape.vocab:
        ids, cand, inside = _candidates(lg, p.top_k, shape.candidates)
        cand = torch.where(inside, cand.to(torch.float64), float("-inf"))
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
