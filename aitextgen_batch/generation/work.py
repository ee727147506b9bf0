"""What the engine works on: an item's result, its work record, prompt buckets and cache lengths."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .params import SamplingParams
from .stops import StopMatcher

# Re-draws of an empty output (nonempty_output) before giving up and returning the empty text.
MAX_ATTEMPTS = 8


@dataclass
class GenerationResult:
    """One generated sample. `text` is the continuation only; `num_generated_tokens` counts eos."""

    item_index: int
    sample_index: int
    seed: int
    text: str = ""
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    finish_reason: str = "error"  # eos | length | stop | error
    error: str | None = None
    # The generated tokens, the final eos (or stop token id) included when the row ended with one: as many as
    # `token_logprobs`, `num_generated_tokens` of them. The text decodes them without that final token.
    token_ids: list[int] = field(default_factory=list)
    attempts: int = 1
    # Structured output: whether the text satisfies the row's constraint (None without one; False unless it ended at
    # eos), checked on the text itself (`constraints.is_valid`).
    valid: bool | None = None
    # The model's log-softmax (before temperature, top-k, top-p or penalties) of each generated token, eos
    # included (so there are `num_generated_tokens` of them), and their sum.
    token_logprobs: list[float] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    # With `top_logprobs` K: at each generated position, the K most likely tokens under the model (raw logits, as
    # `token_logprobs`), best first, ties by lower id: [[(token id, log-probability), ...], ...].
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    # With `prompt_logprobs`: each prompt token's log-probability under the model given the tokens before it (None for
    # the first, which has none before it).
    prompt_logprobs: list[float | None] = field(default_factory=list)


@dataclass
class WorkItem:
    """An item in the engine: its result so far, prompt tokens, bucket, params, stop matcher and grammar."""

    result: GenerationResult
    prompt_ids: list[int]
    bucket: int
    params: SamplingParams
    matcher: StopMatcher | None
    grammar: str | None = None  # the compiled structured-output constraint (llguidance), if any
    attempt: int = 0
    checked: int = 0  # leading tokens known to hold no stop string


def bucket_length(n: int, limit: int) -> int:
    """Padded prompt length for an n-token prompt: 8, 16, 24, 32, 48, 64, 96, 128, ... capped at `limit`."""
    b = 8
    while b < n:
        b = b + 8 if b < 32 else b * 3 // 2 if (b & (b - 1)) == 0 else b * 4 // 3
    return max(n, min(b, limit))


def cache_length(bucket: int, max_new_tokens: int) -> int:
    """Cache positions for a bucket: room for every new token, rounded up to 64 so few shapes exist."""
    return 64 * math.ceil((bucket + max_new_tokens) / 64)


def reach(w: WorkItem) -> int:
    """Cache positions an item can fill: its bucket and every token it may generate."""
    return w.bucket + w.params.max_new_tokens


def redraw(w: WorkItem) -> bool:
    """Whether an empty result is drawn again from the item's own stream (`nonempty_output`)."""
    return w.params.nonempty_output and not w.result.text.strip() and w.attempt + 1 < MAX_ATTEMPTS
