"""A shard's input rows as generation work: each row's prompt, its sampling params, or what is wrong with it.

The prompt is the row's prompt column, or, for a chat job, its conversation rendered with the job's template (the
rendered text is what is generated from and what the output's `prompt` column holds, so replay needs no template).
The requests of an OpenAI batch file have one or the other: a chat request its messages, a completion its prompt; a
request that cannot be served has its reason in the error column and is an error row.
The params are the job's, with the row's `--params-column` values over them: a struct, or JSON text of an object;
a null row, or a null field, keeps the job's value. Every value is checked with the rules of its flag.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import UserError
from ..generation.params import SamplingParams, with_overrides
from ..generation.prompts import prompt_error
from .manifest import JobSpec


@dataclass
class RowWork:
    """Per input row: the prompt to generate from (None when it has none), the effective params (None when the
    row's own are invalid) and the error of each bad row."""

    prompts: list[str | None]
    params: list[SamplingParams | None]
    errors: dict[int, str] = field(default_factory=dict)


def decode_column(column, origins: list[str], what: str) -> tuple[list, dict[int, str]]:
    """A column's Python values, and {row: error} for rows holding text that is not valid UTF-8 (null values)."""
    try:
        return column.to_pylist(), {}
    except UnicodeDecodeError:
        pass
    values, errors = [], {}
    for r in range(len(column)):
        try:
            values.append(column[r].as_py())
        except UnicodeDecodeError as exc:
            values.append(None)
            errors[r] = f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start}) in {origins[r]}"
    return values, errors


def _json(value, what: str):
    """A value as given (a struct or list), or parsed from JSON text; (value, error)."""
    if not isinstance(value, str):
        return value, None
    try:
        return json.loads(value), None
    except json.JSONDecodeError as exc:
        return None, f"{what} is not valid JSON ({exc.msg} at character {exc.pos})"


def row_params(base: SamplingParams, value, column: str) -> tuple[SamplingParams | None, str | None]:
    """The row's effective params: `base` with the row's non-null fields over it; (params, None) or (None, error)."""
    what = f"--params-column {column!r}"
    value, err = _json(value, what)
    if err is not None:
        return None, err
    if value is None:
        return base, None
    if not isinstance(value, dict):
        return None, f"{what} must hold an object of sampling fields, got {type(value).__name__}"
    try:
        return with_overrides(base, {k: v for k, v in value.items() if v is not None}), None
    except UserError as exc:
        return None, f"{what}: {exc}"


def prepare_rows(job: JobSpec, table, origins: list[str], tokenizer) -> RowWork:
    """Each row's prompt (rendered, for a chat job) and effective params, or its error (the first thing wrong).

    Whatever goes wrong while preparing one row (its text, its conversation, the template on it, its params) is that
    row's error, never its shard's.
    """
    ident = job.identity
    cols, chat = ident.columns, ident.chat
    base = ident.sampling
    mode = chat.mode if chat is not None else None
    source = cols.messages if mode == "messages" else cols.prompt
    raw, errors = decode_column(table.column(source), origins, "messages" if source == cols.messages else "prompt")
    n = len(raw)
    messages = [None] * n
    if mode == "requests":  # a chat request's messages, a completion's prompt
        messages, bad = decode_column(table.column(cols.messages), origins, "messages")
        errors.update(bad)
    refused = decode_column(table.column(cols.error), origins, "the error")[0] if cols.error else [None] * n
    values, bad = [None] * n, {}
    if cols.params:
        values, bad = decode_column(table.column(cols.params), origins, f"--params-column {cols.params!r}")
    renderer = None
    if chat is not None:
        from ..generation.chat import ChatRenderer

        renderer = ChatRenderer(tokenizer, system_prompt=chat.system_prompt, template=job.chat_template)
    prompts: list = [None] * n
    params: list = [base] * n
    for r in range(n):
        if refused[r] is not None:  # a request that cannot be served: never generated
            prompts[r], params[r], errors[r] = None, None, refused[r]
            continue
        try:
            if r in errors:
                prompts[r], err = None, errors[r]
            elif messages[r] is not None:
                prompts[r], err = _prompt(messages[r], "messages", renderer)
            else:
                prompts[r], err = _prompt(raw[r], None if mode == "requests" else mode, renderer)
            if cols.params:
                params[r], perr = (None, bad[r]) if r in bad else row_params(base, values[r], cols.params)
                err = err or perr
        except Exception as exc:  # anything else one row's values make go wrong stays that row's
            prompts[r] = raw[r] if isinstance(raw[r], str) and chat is None else None
            params[r], err = None, f"cannot prepare this row ({type(exc).__name__}: {exc})"
        if err is not None:
            errors[r] = err
    return RowWork(prompts, params, errors)


def _prompt(value, mode: str | None, renderer) -> tuple[str | None, str | None]:
    """A row's prompt text from its prompt (`mode` None: as it is; "prompt": as one user message) or its messages
    ("messages"), or (the text kept in the output, its error)."""
    if mode is None:
        return value, prompt_error(value)
    if mode == "messages":
        messages, err = _json(value, "messages")
        text, err = (None, err) if err else renderer.render(messages)
        return text, err or prompt_error(text)
    err = prompt_error(value)
    text, err = (None, err) if err else renderer.render_user(value)
    if err is not None:  # a bad --chat row keeps its prompt text in the output
        return value, err
    return text, prompt_error(text)
