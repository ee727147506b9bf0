"""The results file of a batch job: one line per request, in the request file's order, from the finished shards.

Each line is the OpenAI batch output format, `{"id", "custom_id", "response": {"status_code": 200, "request_id",
"body"}, "error": null}`, its body a `chat.completion` or a `text_completion` (choices, `finish_reason` stop/length,
log-probabilities when the request asked for them, `usage`). A request that failed is a line with `"response": null`
and `"error": {"code", "message", "param", "line"}` (OpenAI's `BatchError`): `invalid_request` for a request or row
that cannot be served, `server_error` for a shard that failed its attempts (rerun to retry it). Never a missing line.

Every value is a function of the job folder: ids derive from the model fingerprint and the `custom_id`, `created` is
the job's start (kept across resumes) or `$SOURCE_DATE_EPOCH` when set, so a resumed job writes the file an
uninterrupted one would, byte for byte. The file is written under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

from ...errors import UserError
from ...storage import Location, atomic_write, is_uri
from ..manifest import JobSpec, part_name
from .requests import CHAT

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
FLOOR = -9999.0  # OpenAI's value for a log-probability too small to print (and vLLM's)


@dataclass
class Written:
    """What `write_results` wrote."""

    path: str
    requests: int
    errors: int


def write_results(job: JobSpec, results: str, tokenizer) -> Written:
    """Write the results file of finished batch job `job` (its shards read one at a time) to `results`, atomically."""
    from ..shard import read_rows
    from ..verify import _read, check_parts

    out = Location(job.output)
    parts = check_parts(out, job)
    make = Responses(job, TokenTexts(tokenizer))
    written = Written(results, 0, 0)
    with _atomic(results) as f:
        for plan in job.shards:
            name = part_name(plan.shard)
            if name in parts.records:
                lines = make.lines(_read(out, name).to_pylist())
            else:  # failed (or never run): its requests are error lines
                why = job.failed.get(str(plan.shard)) or "the job did not finish this shard"
                why = f"not generated ({why}); rerun run-batch to retry it"
                rows = read_rows(job, plan)
                lines = [make.failed(i, n, why) for i, n in zip(rows.ids, rows.table["line"].to_pylist(), strict=True)]
            for line in lines:
                f.write((json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n").encode())
                written.requests += 1
                written.errors += line["error"] is not None
    return written


class Responses:
    """Builds the output line of each request from its rows (one per sample)."""

    def __init__(self, job: JobSpec, texts: TokenTexts):
        self.texts = texts
        ident = job.identity
        self.model = ident.requests.served_model_names[0]
        self.key = f"{ident.model_fingerprint}|{ident.job_seed}"
        self.fingerprint = "fp_" + ident.model_fingerprint.split(":")[-1][:16]
        self.created = created(job)

    def lines(self, rows: list[dict]) -> list[dict]:
        """The lines of a part file's rows (consecutive rows of one id are one request's samples)."""
        return [self.line(list(group)) for _, group in itertools.groupby(rows, key=lambda r: r["id"])]

    def _ids(self, custom_id: str) -> str:
        return hashlib.sha256(f"{self.key}|{custom_id}".encode()).hexdigest()

    def failed(self, custom_id: str, line: int, message: str, param=None, code: str = "server_error") -> dict:
        error = {"code": code, "message": message, "param": param, "line": line}
        return {
            "id": f"batch_req_{self._ids(custom_id)[:32]}",
            "custom_id": custom_id,
            "response": None,
            "error": error,
        }

    def line(self, rows: list[dict]) -> dict:
        first = rows[0]
        bad = next((r for r in rows if r["finish_reason"] == "error"), None)
        if bad is not None:
            return self.failed(first["id"], first["line"], bad["error"], first["error_param"], "invalid_request")
        h = self._ids(first["id"])
        chat = first["url"] == CHAT
        rows = sorted(rows, key=lambda r: r["sample_index"])
        body = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{h[:32]}",
            "object": "chat.completion" if chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [self.choice(r, chat) for r in rows],
            "usage": usage(rows),
            "system_fingerprint": self.fingerprint,
        }
        response = {"status_code": 200, "request_id": f"req_{h[32:64]}", "body": body}
        return {"id": f"batch_req_{h[:32]}", "custom_id": first["id"], "response": response, "error": None}

    def choice(self, row: dict, chat: bool) -> dict:
        finish = FINISH[row["finish_reason"]]
        if chat:
            message = {"role": "assistant", "content": row["text"]}
            logprobs = {"content": self.token_logprobs(row)} if row["logprobs"] else None
            return {"index": row["sample_index"], "message": message, "logprobs": logprobs, "finish_reason": finish}
        logprobs = self.legacy_logprobs(row) if row["logprobs"] else None
        return {"index": row["sample_index"], "text": row["text"], "logprobs": logprobs, "finish_reason": finish}

    def token_logprobs(self, row: dict) -> list[dict]:
        """`logprobs.content` of a chat choice: every generated token (the final eos too, as `usage` counts it)."""
        ids, lps = row["token_ids"], row["token_logprobs"]
        tops = row.get("top_logprobs") or [[]] * len(ids)
        content = []
        for t, lp, top in zip(ids, lps, tops, strict=True):
            alternatives = [self.texts.entry(a["token_id"], a["logprob"]) for a in top]
            content.append({**self.texts.entry(t, lp), "top_logprobs": alternatives})
        return content

    def legacy_logprobs(self, row: dict) -> dict:
        """`logprobs` of a completion choice: tokens, their log-probabilities, the top ones, and text offsets."""
        tokens = [self.texts.text(t) for t in row["token_ids"]]
        offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0)) if tokens else []
        top = row.get("top_logprobs")
        return {
            "tokens": tokens,
            "token_logprobs": [logprob(v) for v in row["token_logprobs"]],
            "top_logprobs": [{self.texts.text(a["token_id"]): logprob(a["logprob"]) for a in pos} for pos in top]
            if top
            else None,
            "text_offset": offsets,
        }


def usage(rows: list[dict]) -> dict:
    prompt = rows[0]["num_prompt_tokens"]
    generated = sum(r["num_generated_tokens"] for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def logprob(value) -> float:
    """A stored (float32) log-probability as the shortest decimal that reads back to it; -9999.0 below that."""
    import numpy as np

    if value is None or not math.isfinite(value) or value < FLOOR:
        return FLOOR
    return float(str(np.float32(value)))


def created(job: JobSpec) -> int:
    """The responses' `created`: `$SOURCE_DATE_EPOCH` when set (reproducible files), else when the job first started.

    Raises:
        UserError: `SOURCE_DATE_EPOCH` is not an integer.
    """
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return int(job.created or 0)
    try:
        return int(value)
    except ValueError:
        raise UserError(f"SOURCE_DATE_EPOCH must be an integer (seconds since 1970), got {value!r}") from None


class TokenTexts:
    """A token's text and UTF-8 bytes as OpenAI reports them: `bytes` are the token's own bytes (a piece of a multi-byte
    character included), `token` their text (U+FFFD for an incomplete character)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders") or []}
        self.byte_level = _byte_decoder() if "ByteLevel" in kinds else None
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        if token_id not in self.cache:
            raw = self._bytes(token_id)
            self.cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return self.cache[token_id]

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def entry(self, token_id: int, value) -> dict:
        text, raw = self.get(token_id)
        return {"token": text, "logprob": logprob(value), "bytes": raw}

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tok.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if token_id in self.added:
            return piece.encode()
        if self.byte_level is not None:  # GPT-2's byte-to-character map, undone
            if all(c in self.byte_level for c in piece):
                return bytes(self.byte_level[c] for c in piece)
            return piece.encode()
        hex_byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)  # SentencePiece's byte fallback
        if hex_byte:
            return bytes([int(hex_byte.group(1), 16)])
        return piece.replace("\u2581", " ").encode()


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable character of each byte, reversed (the map byte-level BPE vocabularies are written in)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: b for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = 256 + n
    return {chr(c): b for b, c in chars.items()}


@contextmanager
def _atomic(results: str):
    """A binary file that becomes `results` whole when the block succeeds (a local temporary name and a rename; on an
    object store, one upload of the finished file)."""
    if not is_uri(results):
        with atomic_write(results) as f:
            yield f
        return
    import tempfile

    parent, name = results.rstrip("/").rsplit("/", 1)
    with tempfile.TemporaryDirectory(prefix="aitextgen-batch-results-") as tmp:
        local = os.path.join(tmp, name)
        with open(local, "wb") as f:
            yield f
        Location(parent).put_file(local, name)
