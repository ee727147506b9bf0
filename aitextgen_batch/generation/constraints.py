"""Structured output: JSON Schema, regex, choice and Lark-grammar constraints, with llguidance.

A row's constraint (`SamplingParams.constraint`) is compiled by llguidance (MIT; the grammar backend vLLM and SGLang
use) into a matcher over the model's tokenizer. At every decode step the engine asks each constrained row's matcher
for the tokens its grammar allows next (a bitmask of the vocabulary, computed on the host from the row's own tokens
only), and the step's sampler sees the other tokens' logits at -inf: before temperature, top-k and top-p, so the
row's draw is the same law restricted to what the grammar allows. The sampled token is then consumed by the matcher.
When the grammar is complete it allows only eos, so the row ends there (`finish_reason` eos); a row cut at
`max_new_tokens` ends with `length` and is never `valid`.

The reported log-probabilities stay the model's own (raw logits), as for every row.

Validity (`is_valid`) is checked on the text, not taken from the mask: a JSON Schema row must parse as JSON and pass
the `jsonschema` package's validation; a regex row must match the whole text (Python's `re`); a choice row must be one
of the choices; a grammar row's tokens must leave a fresh matcher accepting.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

from ..errors import UserError


def read_spec(name: str, value: str) -> str:
    """The text of a flag's constraint: the file `value` names when it is one, else `value` itself."""
    from ..config import flag

    if len(value) < 4096 and "\n" not in value and os.path.isfile(value):
        try:
            with open(value, encoding="utf-8-sig") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{name} ({flag(name)}): cannot read {value!r} as UTF-8 text ({exc})") from exc
    return value


def from_response_format(value) -> dict:
    """The constraint fields of an OpenAI `response_format`: `{"type": "json_schema", "json_schema": {"schema": ...}}`,
    `{"type": "json_object"}` (any JSON object) or `{"type": "text"}` (none).

    Raises:
        UserError: a value of another shape (named).
    """
    if not isinstance(value, dict) or value.get("type") not in ("json_schema", "json_object", "text"):
        raise UserError(
            'response_format must be {"type": "json_schema", "json_schema": {"schema": {...}}}, '
            f'{{"type": "json_object"}} or {{"type": "text"}}, got {json.dumps(value)[:200]}'
        )
    if value["type"] == "text":
        return {}
    if value["type"] == "json_object":
        return {"json_schema": {"type": "object"}}
    spec = value.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise UserError('response_format of type json_schema needs "json_schema": {"name": ..., "schema": {...}}')
    return {"json_schema": schema}


# The JSON a schema constraint writes: no free whitespace (a small model given room for it wanders into blank lines),
# and the separators of `json.dumps`.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_text(kind: str, spec) -> str:
    """The llguidance grammar of one constraint."""
    from llguidance import LLMatcher

    if kind == "json_schema":  # one line, as `json.dumps` writes it (a schema's own "x-guidance" may say otherwise)
        return LLMatcher.grammar_from_json_schema(spec, defaults=JSON_LAYOUT)
    if kind == "regex":
        return LLMatcher.grammar_from_regex(spec)
    if kind == "choice":
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in spec))
    return LLMatcher.grammar_from_lark(spec)


class Grammars:
    """Compiles constraints for one tokenizer into llguidance grammars, once each, and makes matchers."""

    def __init__(self, tokenizer, vocab: int, eos_ids: list[int]):
        import llguidance.hf

        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab, eos_token=eos_ids[:1] or None)
        self.vocab = vocab
        self._compiled: dict[tuple, tuple[str | None, str | None]] = {}

    def compile(self, kind: str, spec) -> tuple[str | None, str | None]:
        """(grammar, None), or (None, why the constraint does not compile)."""
        from llguidance import LLMatcher

        key = (kind, json.dumps(spec) if not isinstance(spec, str) else spec)
        if key not in self._compiled:
            try:
                grammar = grammar_text(kind, spec)
                error = LLMatcher.validate_grammar(grammar, self.tokenizer)
            except (ValueError, TypeError, RuntimeError) as exc:
                grammar, error = None, str(exc)
            first = (error or "").strip().splitlines()
            self._compiled[key] = (grammar, None) if not error else (None, f"{kind} does not compile: {first[0]}")
        return self._compiled[key]

    def matcher(self, grammar: str):
        from llguidance import LLMatcher

        return LLMatcher(self.tokenizer, grammar, log_level=0)


def check_constraint(params, tokenizer, vocab: int | None = None) -> None:
    """Refuse, before any work, a job-wide constraint that does not compile with the model's tokenizer.

    Raises:
        UserError: naming the flag and llguidance's reason.
    """
    from ..config import flag

    if params.constraint is None:
        return
    kind, spec = params.constraint
    _, error = Grammars(tokenizer, vocab or len(tokenizer), [tokenizer.eos_token_id or 0]).compile(kind, spec)
    if error:
        raise UserError(f"{flag(kind)}: {error}")


@lru_cache(maxsize=64)
def _schema_validator(schema_text: str):
    import jsonschema

    schema = json.loads(schema_text)
    return jsonschema.validators.validator_for(schema)(schema)


def is_valid(params, text: str, token_ids: list[int], finish_reason: str, grammars: Grammars | None) -> bool | None:
    """Whether a finished row's text satisfies its constraint (None when it has none); a row not ended by its grammar
    (eos) is never valid."""
    import re

    if params.constraint is None:
        return None
    if finish_reason != "eos":
        return False
    kind, spec = params.constraint
    if kind == "choice":
        return text in spec
    if kind == "regex":
        try:
            return re.fullmatch(spec, text) is not None
        except re.error:  # a pattern only the Rust syntax takes: the grammar's own judgment of the tokens
            kind = "grammar-tokens"
    if kind == "json_schema":
        try:
            instance = json.loads(text)
        except ValueError:
            return False
        return _schema_validator(spec).is_valid(instance)
    if grammars is None:
        return False
    grammar, _ = grammars.compile(*params.constraint)
    matcher = grammars.matcher(grammar)
    body = token_ids[:-1] if token_ids and finish_reason == "eos" else token_ids
    return matcher.consume_tokens(body) and matcher.is_accepting()
