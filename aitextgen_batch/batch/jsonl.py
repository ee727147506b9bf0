"""JSONL inputs: each file is read twice, streamed: once to check every line, once into a Parquet copy the job reads.

A JSONL input holds one JSON object per line; blank lines are skipped and rows are numbered from 0 over the
objects (a derived id is `file.jsonl:ROW`). The column flags name keys. Every line is checked before any work: a
line that is not JSON, or not an object, or whose prompt is not a string, or whose id or seed is not an integer
(or string id) is refused with its file and line number. A key missing from a line is a null for that row; a key
that no line has is refused, as a missing Parquet column is. Messages and params values are kept as JSON text, so
a malformed one becomes that row's error as in Parquet; kept columns get the Arrow type of their values.

Text that is not valid Unicode (a lone surrogate such as `\ud83d`, which JSON escapes can make and no UTF-8 file can
hold) is treated as invalid bytes in Parquet are: in a prompt, messages or params it makes that row an error row (the
copy holds it as the same invalid UTF-8 a Parquet file would), in an id or a kept column it is refused with its line.

The copy is written on the driver (a temporary folder) and, once the job's output has been checked to be this
job's, copied to OUT/_inputs/: actors on any node read it from the job's own storage.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

from ..config import unicode_error
from ..errors import UserError
from ..storage import filesystem
from .manifest import Columns

BATCH_LINES = 8192  # lines per record batch: the driver holds one batch at a time
INT64 = (-(2**63), 2**63 - 1)


def is_jsonl(path: str) -> bool:
    return path.lower().endswith(".jsonl")


def _kind(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _objects(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `path`; a bad line is refused, named."""
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as stream:
        for n, raw in enumerate(io.BufferedReader(stream), 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError as exc:
                raise UserError(f"{path} line {n}: not valid UTF-8 ({exc.reason}); fix the file") from None
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{path} line {n}: not valid JSON ({exc.msg} at column {exc.colno}); fix or remove the line"
                ) from None
            if not isinstance(obj, dict):
                raise UserError(f"{path} line {n}: must be a JSON object {{...}}, got a JSON {_kind(obj)}")
            yield n, obj


def _roles(columns: Columns) -> dict[str, tuple[str, str]]:
    """Key -> (role, flag): how each wanted key is checked and stored."""
    roles = {c: ("keep", "--keep-columns") for c in columns.keep}
    if columns.messages:
        roles[columns.messages] = ("json", "--messages-column")
    else:
        roles[columns.prompt] = ("text", "--prompt-column")
    if columns.params:
        roles[columns.params] = ("json", "--params-column")
    if columns.seed:
        roles[columns.seed] = ("int", "--seed-column")
    if columns.id:
        roles[columns.id] = ("id", "--id-column")
    return roles


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class _Scan:
    """What the checking pass learns: rows, which keys occur, the id kind and the kept columns' Arrow types."""

    def __init__(self, path: str, roles: dict[str, tuple[str, str]]):
        self.path, self.roles = path, roles
        self.rows = 0
        self.seen = dict.fromkeys(roles, 0)
        self.first_missing: dict[str, int] = {}
        self.id_kind: str | None = None
        self.types: dict = {}
        self.pending: dict[str, list] = {c: [] for c, (role, _) in roles.items() if role == "keep"}
        self.lines: list[int] = []

    def line(self, n: int, obj: dict) -> None:
        self.rows += 1
        self.lines.append(n)
        for c, (role, flag) in self.roles.items():
            if c not in obj:
                self.first_missing.setdefault(c, n)
                if role == "keep":
                    self.pending[c].append(None)
                continue
            self.seen[c] += 1
            v = obj[c]
            if role in ("keep", "id") and (err := _text_error(v)) is not None:
                self._bad(n, c, flag, f"is not valid Unicode ({err})", v)
            if role == "keep":
                self.pending[c].append(v)
            elif role == "text" and not (v is None or isinstance(v, str)):
                self._bad(n, c, flag, "must be a string", v)
            elif role == "int" and not (v is None or (_is_int(v) and INT64[0] <= v <= INT64[1])):
                self._bad(n, c, flag, "must be an integer (64-bit)", v)
            elif role == "id":
                self._id(n, c, flag, v)
        if len(self.lines) >= BATCH_LINES:
            self.flush()

    def _id(self, n: int, c: str, flag: str, v) -> None:
        kind = "int" if _is_int(v) and INT64[0] <= v <= INT64[1] else "string" if isinstance(v, str) else None
        if kind is None:
            self._bad(n, c, flag, "must be a string or a 64-bit integer", v)
        if self.id_kind not in (None, kind):
            self._bad(n, c, flag, f"is a {kind} but earlier lines have {self.id_kind} ids; use one kind", v)
        self.id_kind = kind

    def _bad(self, n: int, c: str, flag: str, what: str, v) -> None:
        raise UserError(f"{self.path} line {n}: {c!r} ({flag}) {what}, got {json.dumps(v)[:80]} (a JSON {_kind(v)})")

    def flush(self) -> None:
        """Fold the pending kept values into their column types (a conflict is named with its line)."""
        import pyarrow as pa

        for c, values in self.pending.items():
            try:
                t = pa.array(values).type
                self.types[c] = _unify(self.types.get(c, pa.null()), t)
            except (pa.ArrowException, OverflowError):
                have = self.types.get(c, pa.null())
                for n, v in zip(self.lines, values, strict=True):
                    try:
                        have = _unify(have, pa.array([v]).type)
                    except (pa.ArrowException, OverflowError):
                        self._bad(n, c, "--keep-columns", f"does not fit the type of earlier lines ({have})", v)
                raise
            values.clear()
        self.lines.clear()

    def finish(self) -> None:
        self.flush()
        if not self.rows:
            return
        for c, (role, flag) in self.roles.items():
            if self.seen[c] == 0 and role != "id":
                raise UserError(f"{self.path}: no line has the key {c!r} ({flag}); check the flag, or the file's keys")
            if role == "id" and 0 < self.seen[c] < self.rows:
                raise UserError(
                    f"{self.path} line {self.first_missing[c]}: no {c!r} (--id-column) while other lines have one; "
                    "give every line an id, or none (ids then derive from file name and row)"
                )


def _text_error(value) -> str | None:
    """Why some text inside `value` (a JSON value) is not valid Unicode, or None."""
    if isinstance(value, str):
        return unicode_error(value)
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list):
        return next((err for v in value if (err := _text_error(v)) is not None), None)
    return None


def _unify(a, b):
    import pyarrow as pa

    merged = pa.unify_schemas([pa.schema([("v", a)]), pa.schema([("v", b)])], promote_options="permissive")
    return merged.field("v").type


def stage_jsonl(path: str, dest: Path, columns: Columns) -> None:
    """Check every line of JSONL file `path`, then write its wanted keys to Parquet file `dest` (both streamed).

    Raises:
        UserError: a bad line or value, named by file and line number, or a key that no line has.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    roles = _roles(columns)
    scan = _Scan(path, roles)
    for n, obj in _objects(path):
        scan.line(n, obj)
    scan.finish()
    fixed = {"text": pa.string(), "json": pa.string(), "int": pa.int64()}
    fields = []
    for c, (role, _) in roles.items():
        if scan.seen[c]:
            t = scan.types[c] if role == "keep" else fixed.get(role)
            fields.append(pa.field(c, t or (pa.int64() if scan.id_kind == "int" else pa.string())))
    schema = pa.schema(fields)
    with pq.ParquetWriter(str(dest), schema) as writer:
        batch: list[dict] = []
        for _, obj in _objects(path):
            batch.append(obj)
            if len(batch) >= BATCH_LINES:
                writer.write_table(_table(batch, schema, roles))
                batch = []
        if batch or not scan.rows:
            writer.write_table(_table(batch, schema, roles))


def _table(objs: list[dict], schema, roles):
    import pyarrow as pa

    def value(obj, c):
        v = obj.get(c)
        if roles[c][0] == "json" and v is not None and not isinstance(v, str):
            # escaped where it holds invalid text: the row's check then meets the lone surrogate and names it
            return json.dumps(v, ensure_ascii=_text_error(v) is not None)
        return v

    return pa.table({f.name: _array([value(o, f.name) for o in objs], f.type) for f in schema}, schema=schema)


def _array(values: list, type_):
    """An Arrow column of `values`; a string holding a lone surrogate is stored as the invalid UTF-8 it encodes to,
    exactly as a Parquet file with those bytes holds it (the shard makes that row an error row)."""
    import pyarrow as pa

    try:
        return pa.array(values, type_)
    except UnicodeEncodeError:
        if not pa.types.is_string(type_):
            raise
        raw = [v.encode("utf-8", "surrogatepass") if isinstance(v, str) else v for v in values]
        return pa.array(raw, pa.binary()).view(pa.string())
