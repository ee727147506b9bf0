"""The reference sampler, for tests: numpy, float64, row by row. The engine samples on the device (`sampler`); the
tests hold its law to this one.

Choose next tokens for a block of rows, each row from its own logits and its own uniform draw.

Every operation is row-wise with a fixed order of evaluation (elementwise maths, `max`, stable sorts and
sequential `cumsum` along the vocabulary), so a row's choice depends on that row alone. Maths runs in
float64 on the CPU whatever the model's dtype.
"""

from __future__ import annotations

import numpy as np

from .params import SamplingParams


def _top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep exactly k tokens per row: the k largest, ties broken by lower token id."""
    vocab = logits.shape[1]
    kth = np.partition(logits, vocab - k, axis=1)[:, vocab - k][:, None]
    above = logits > kth
    need = k - above.sum(axis=1, keepdims=True)
    ties = logits == kth
    return above | (ties & (np.cumsum(ties, axis=1) <= need))


def _top_p_mask(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest prefix (by probability, ties by token id) whose mass reaches `top_p`."""
    order = np.argsort(-logits, axis=1, kind="stable")
    ls = np.take_along_axis(logits, order, axis=1)
    ps = np.exp(ls - ls[:, :1])
    cs = np.cumsum(ps, axis=1)
    keep_sorted = (cs - ps) < top_p * cs[:, -1:]
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    return keep


def choose_tokens(
    logits: np.ndarray,
    params: SamplingParams,
    uniforms: np.ndarray,
    seen: np.ndarray | None = None,
    suppress_ids: list[int] | None = None,
) -> np.ndarray:
    """Pick one token per row.

    Args:
        logits: (rows, vocab) next-token logits.
        params: temperature 0 is argmax (lowest id on ties); else temperature, top-k, top-p, then an
            inverse-CDF draw in token-id order with the row's uniform.
        uniforms: (rows,) draws in [0, 1), one per row.
        seen: (rows, vocab) bool, tokens already in the row (prompt + generated) for the repetition penalty.
        suppress_ids: token ids that must not be chosen now (eos before `min_new_tokens`).

    Returns:
        (rows,) int64 token ids.
    """
    lg = logits.astype(np.float64)
    if params.repetition_penalty != 1.0 and seen is not None:
        rp = params.repetition_penalty
        lg = np.where(seen, np.where(lg > 0, lg / rp, lg * rp), lg)
    if suppress_ids:
        lg[:, suppress_ids] = -np.inf
    if params.greedy:
        return np.argmax(lg, axis=1)
    lg = lg / params.temperature
    ids = None
    if 0 < params.top_k < lg.shape[1]:
        # Keep only the k candidates (in token-id order, as np.nonzero lists them): the rest of the
        # work runs on (rows, k) instead of (rows, vocab) and gives the same draw.
        keep = _top_k_mask(lg, params.top_k)
        ids = np.nonzero(keep)[1].reshape(lg.shape[0], params.top_k)
        lg = np.take_along_axis(lg, ids, axis=1)
    if params.top_p < 1.0:
        lg = np.where(_top_p_mask(lg, params.top_p), lg, -np.inf)
    probs = np.exp(lg - lg.max(axis=1, keepdims=True))
    cum = np.cumsum(probs, axis=1)
    threshold = uniforms[:, None] * cum[:, -1:]
    # The first index whose cumulative mass passes the threshold always has non-zero probability.
    pick = np.argmax(cum > threshold, axis=1)
    return pick if ids is None else ids[np.arange(len(pick)), pick]


def softmax_reference(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """The distribution `choose_tokens` samples from (no penalty, no suppression): for tests and docs."""
    lg = logits.astype(np.float64)[None, :] / params.temperature
    if 0 < params.top_k < lg.shape[1]:
        lg = np.where(_top_k_mask(lg, params.top_k), lg, -np.inf)
    if params.top_p < 1.0:
        lg = np.where(_top_p_mask(lg, params.top_p), lg, -np.inf)
    p = np.exp(lg - lg.max())
    return (p / p.sum())[0]
