"""An OpenAI batch file's requests as the rows of a job.

Each line is `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}`.
The file is read once, streamed, into a Parquet copy of fixed columns (`SCHEMA`) that the job reads as any input:
`custom_id` is the row id, a chat request's `messages` (rendered on the actors with the chat template) or a
completion's `prompt`, the body's sampling fields as the row's params (our names), its `seed` (null: derived from the
job seed and the `custom_id`), and what the results file needs back (`line`, `url`, `logprobs`, `error_param`).

A line that is not a JSON object, or whose `custom_id` is missing, not a non-empty string, or used twice, refuses the
file with its line number: its result could not be told apart. Any other request that cannot be served (a body field
this engine does not support, a `model` that is not the served one, a value out of range, another url or method) is a
row with its reason in `request_error`: an error row in the job, an error line in the results, never a field
silently ignored. Null body values are absent values, as in the OpenAI API.
"""

from __future__ import annotations

import hashlib
import json
import re
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path

from ...config import SEED_MAX, unicode_error
from ...errors import UserError
from ...generation.chat import message_error
from ...generation.params import SamplingParams, with_overrides
from ..jsonl import BATCH_LINES, _objects, _text_error
from ..manifest import Columns, RequestSpec

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
# the columns the results file needs, kept from the requests into the job's output
KEPT = ["line", "url", "logprobs", "error_param"]
COLUMNS = Columns(
    prompt="prompt",
    id="custom_id",
    seed="seed",
    keep=KEPT,
    messages="messages",
    params="params",
    error="request_error",
)
# body field -> the sampling field it sets (vLLM's extensions too: top_k, min_tokens, repetition_penalty, ...)
SAMPLING = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "n": "num_return_sequences",
    "stop": "stop",
    "response_format": "response_format",
    "top_k": "top_k",
    "min_tokens": "min_new_tokens",
    "repetition_penalty": "repetition_penalty",
    "stop_token_ids": "stop_token_ids",
    "skip_special_tokens": "skip_special_tokens",
}
# body fields accepted only at the value that changes nothing (a batch never streams, echoes or penalises presence)
NO_OP = {"stream": False, "echo": False, "frequency_penalty": 0, "presence_penalty": 0}
COMMON = {"model", "seed", "logprobs", "user", *SAMPLING, *NO_OP} - {"max_completion_tokens", "echo"}
FIELDS = {
    CHAT: COMMON | {"messages", "max_completion_tokens", "top_logprobs"},
    COMPLETIONS: COMMON | {"prompt", "echo"},
}


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("custom_id", pa.string()),
            ("line", pa.int64()),
            ("url", pa.string()),
            ("messages", pa.string()),  # JSON text of [{role, content}, ...]
            ("prompt", pa.string()),
            ("params", pa.string()),  # JSON text of sampling fields
            ("seed", pa.int64()),
            ("logprobs", pa.bool_()),  # the response carries log-probabilities
            ("request_error", pa.string()),
            ("error_param", pa.string()),  # the body field at fault
        ]
    )


@dataclass
class Request:
    """One line as a row of the job (the columns of `_schema`)."""

    custom_id: str
    line: int
    url: str | None = None
    messages: str | None = None
    prompt: str | None = None
    params: str | None = None
    seed: int | None = None
    logprobs: bool = False
    request_error: str | None = None
    error_param: str | None = None


class Refused(Exception):
    """A request that cannot be served: why, and the body field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def served_model_names(source: str, given: list[str]) -> list[str]:
    """The names a request's `model` may give: `--served-model-name`, else the model as given (`--model`) and its
    folder's name, or the default model's name. The first is the one responses report."""
    if given:
        return list(dict.fromkeys(given))
    if not source:
        from ...models.default import DEFAULT

        return [DEFAULT.name]
    return list(dict.fromkeys([source, source.rstrip("/").rsplit("/", 1)[-1]]))


def translate(obj: dict, line: int, spec: RequestSpec, base: SamplingParams) -> Request:
    """A request line (its `custom_id` already checked) as a row: its prompt or messages, params and seed, or the
    reason it cannot be served."""
    req = Request(obj["custom_id"], line)
    try:
        req.url = _endpoint(obj)
        body = obj.get("body")
        if not isinstance(body, dict):
            raise Refused(f"body must be a JSON object, got {json.dumps(body)[:80]}", "body")
        if (err := _text_error(body)) is not None:
            raise Refused(f"the body holds text that is not valid Unicode ({err})")
        body = {k: v for k, v in body.items() if v is not None}
        _check_fields(body, req.url, spec)
        values = {SAMPLING[k]: v for k, v in body.items() if k in SAMPLING}
        if body.get("top_k") == -1:  # vLLM's spelling of "off"
            values["top_k"] = 0
        limits = [body[k] for k in ("max_tokens", "max_completion_tokens") if k in body]
        if len(limits) == 2 and limits[0] != limits[1]:
            raise Refused("max_tokens and max_completion_tokens differ; give one (max_completion_tokens)", "max_tokens")
        if req.url == CHAT:
            req.messages = json.dumps(_messages(body.get("messages")), ensure_ascii=False)
            req.logprobs = _logprobs_chat(body, values)
        else:
            req.prompt = _prompt(body.get("prompt"))
            req.logprobs = _logprobs_completion(body, values)
        req.seed = _seed(body.get("seed"))
        _check_values(base, values, body)
        req.params = json.dumps(values, sort_keys=True, ensure_ascii=False) if values else None
    except Refused as exc:
        return Request(req.custom_id, line, req.url, request_error=str(exc), error_param=exc.param)
    return req


def _endpoint(obj: dict) -> str:
    extra = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if extra:
        raise Refused(f"{extra[0]!r} is not a field of a batch request line (custom_id, method, url, body)", extra[0])
    method, url = obj.get("method", "POST"), obj.get("url")
    if not isinstance(url, str) or url not in FIELDS:
        raise Refused(f"url {url!r} is not served: the endpoints are {CHAT} and {COMPLETIONS}", "url")
    if method != "POST":
        raise Refused(f"method must be POST, got {method!r}", "method")
    return url


def _check_fields(body: dict, url: str, spec: RequestSpec) -> None:
    unknown = sorted(set(body) - FIELDS[url])
    if unknown:
        raise Refused(
            f"body field {unknown[0]!r} is not supported by {url} here (supported: {', '.join(sorted(FIELDS[url]))}); "
            "remove it from the request",
            unknown[0],
        )
    for name, value in NO_OP.items():
        if name in body and body[name] != value:
            raise Refused(
                f"{name} must be {json.dumps(value)} in a batch (or left out), got {json.dumps(body[name])}", name
            )
    if "user" in body and not isinstance(body["user"], str):
        raise Refused(f"user must be a string, got {json.dumps(body['user'])[:80]}", "user")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise Refused(f"model must be a string, got {json.dumps(model)[:80]}", "model")
    if model is not None and not spec.ignore_model_name and model not in spec.served_model_names:
        raise Refused(
            f"model {model!r} is not served here (this job serves {', '.join(map(repr, spec.served_model_names))}): "
            f"pass --served-model-name {model!r} or --ignore-model-name to answer it with this model",
            "model",
        )


def _messages(value) -> list[dict]:
    """The conversation in the shape chat templates take: text parts joined (as vLLM does), `developer` as `system`."""
    if not isinstance(value, list):
        raise Refused("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise Refused(f"messages[{i}] must be a {{role, content}} object", "messages")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise Refused(f"messages[{i}] field {extra[0]!r} is not supported (only role and content)", "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise Refused(f"messages[{i}].content parts must be text parts ({{type: text, text}})", "messages")
            content = "\n".join(p["text"] for p in content)
        role = "system" if m.get("role") == "developer" else m.get("role")
        out.append({"role": role, "content": content})
    if (err := message_error(out)) is not None:
        raise Refused(err, "messages")
    return out


def _prompt(value) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise Refused("prompt must be a string (one prompt per request in a batch file)", "prompt")
    return value


def _logprobs_chat(body: dict, values: dict) -> bool:
    wanted = body.get("logprobs", False)
    if not isinstance(wanted, bool):
        raise Refused(f"logprobs must be true or false, got {json.dumps(wanted)[:80]}", "logprobs")
    if "top_logprobs" in body:
        if not wanted:
            raise Refused("top_logprobs needs logprobs: true", "top_logprobs")
        values["top_logprobs"] = body["top_logprobs"]
    return wanted


def _logprobs_completion(body: dict, values: dict) -> bool:
    if "logprobs" not in body:
        return False
    values["top_logprobs"] = body["logprobs"]  # the legacy field: how many alternatives at each position
    return True


def _seed(value) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= SEED_MAX:
        raise Refused(f"seed must be an integer in [0, 2**63-1], got {json.dumps(value)[:80]}", "seed")
    return value


def _check_values(base: SamplingParams, values: dict, body: dict) -> None:
    """Each value by the rules of its flag; a bad one is named by its body field."""
    try:
        with_overrides(base, values)
    except UserError as exc:
        names = {**{v: k for k, v in SAMPLING.items() if k in body}, "top_logprobs": _top_name(body)}
        param = next((names.get(k, k) for k in values if _fails(base, {k: values[k]})), None)
        message = re.sub(r" \(--[a-z0-9-]+\)", "", str(exc))  # the flags' names mean nothing in a request
        for ours, theirs in names.items():  # nor do our field names
            message = re.sub(rf"\b{ours}\b", theirs, message)
        prefix = f"{param}: " if param and not message.startswith(param) else ""
        raise Refused(prefix + message, param) from None


def _top_name(body: dict) -> str:
    return "top_logprobs" if "top_logprobs" in body else "logprobs"


def _fails(base: SamplingParams, values: dict) -> bool:
    try:
        with_overrides(base, values)
    except UserError:
        return True
    return False


def stage_requests(path: str, dest: Path, spec: RequestSpec, base: SamplingParams) -> None:
    """Read request file `path` (streamed) and write its requests as rows to Parquet file `dest`.

    Raises:
        UserError: a line that is not a JSON object, or whose `custom_id` is missing, not a non-empty string, or used
            by an earlier line: named with its line (and the earlier one).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema()
    digests, lines = array("Q"), array("q")
    with pq.ParquetWriter(str(dest), schema) as writer:
        batch: list[dict] = []
        for n, obj in _objects(path):
            cid = obj.get("custom_id")
            if not isinstance(cid, str) or not cid or unicode_error(cid) is not None:
                raise UserError(
                    f"{path} line {n}: custom_id must be a non-empty string (valid Unicode), the request's own id; "
                    f"got {json.dumps(cid)[:80]}"
                )
            digests.append(_digest(cid))
            lines.append(n)
            batch.append(asdict(translate(obj, n, spec, base)))
            if len(batch) >= BATCH_LINES:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch = []
        writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    _check_unique(path, digests, lines)


def _digest(custom_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=8).digest(), "big")


def _check_unique(path: str, digests: array, lines: array) -> None:
    """Refuse a `custom_id` used twice, naming both lines; ids are held as 8-byte digests, and a digest shared by two
    lines is confirmed on the ids themselves."""
    import numpy as np

    d = np.frombuffer(digests, np.uint64) if digests else np.zeros(0, np.uint64)
    order = np.argsort(d, kind="stable")
    same = np.nonzero(d[order][1:] == d[order][:-1])[0]
    for i in same:
        a, b = lines[order[i]], lines[order[i + 1]]
        ids = {n: obj["custom_id"] for n, obj in _objects(path) if n in (a, b)}
        if ids[a] == ids[b]:
            raise UserError(
                f"{path} line {b}: custom_id {ids[b]!r} is used again (first on line {a}); every request needs its "
                "own custom_id, which names its result"
            )
