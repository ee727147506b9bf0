"""Read training text incrementally from text, CSV/TSV, Parquet and JSONL files, one document or sample at a time.

Every reader yields `(text, ends)` pairs: `ends` is True when `text` finishes a document (the builder appends eos
after it) and False for a leading piece of a document too large to encode in one call. Nothing reads a whole
file: text files are read in blocks, CSV and JSONL line by line, Parquet in record batches. Text, CSV and JSONL
files are UTF-8, with or without a byte-order mark (a leading BOM is dropped, never a token or part of a header);
text that is not valid UTF-8 or Unicode is refused naming the file and its line (or row).

A large document is cut only at whitespace that every common byte-level pre-tokenizer (GPT-2's and Llama 3's
regex) splits at anyway: after a lone newline between two non-space characters, or failing that before a
single space between two. Encoding the pieces therefore gives exactly the ids of encoding the whole document.
(Tokenizers that add a prefix space to every call, such as SentencePiece/Metaspace ones, differ by one token at
each cut: one every `chunk_chars` characters.)
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..config import unicode_error
from ..errors import UserError

Piece = tuple[str, bool]
KINDS = {"csv": "csv", "tsv": "tsv", "parquet": "parquet", "pq": "parquet", "jsonl": "jsonl", "ndjson": "jsonl"}


def input_kind(path: Path) -> str:
    """`text`, `csv`, `tsv`, `parquet` or `jsonl`, from the suffix (before a `.gz`); unknown suffixes are text."""
    name = path.name.lower().removesuffix(".gz")
    return KINDS.get(name.rsplit(".", 1)[-1] if "." in name else "", "text")


def check_input(path: Path, column: str | None, field: str | None) -> None:
    """Fail before any encoding on a missing file, a missing --field, or a --column the file does not have."""
    if not path.exists():
        raise UserError(f"input {str(path)!r} does not exist")
    if not path.is_file():
        raise UserError(f"input {str(path)!r} is not a file; pass the files inside it (e.g. {path}/*.txt)")
    kind = input_kind(path)
    if kind in ("csv", "tsv"):
        with _open_text(path, newline="") as f:
            header = next(csv.reader(f, delimiter="\t" if kind == "tsv" else ","), None)
        if header is not None:
            _pick_column(path, header, column)
    elif kind == "parquet":
        _parquet_column(path, column)
    elif kind == "jsonl" and not field:
        raise UserError(f"input {str(path)!r} is JSONL: pass --field, the key that holds the text")


def read_documents(path: Path, *, line_by_line: bool, column: str | None, field: str | None, chunk_chars: int):
    """Yield (text, ends) pieces of `path` (see the module docstring)."""
    kind = input_kind(path)
    try:
        if kind == "text" and line_by_line:
            yield from _text_lines(path)
        elif kind == "text":
            with _open_text(path) as f:
                yield from document_pieces(iter(lambda: f.read(chunk_chars), ""), chunk_chars)
        elif kind in ("csv", "tsv"):
            yield from _csv_rows(path, column, "\t" if kind == "tsv" else ",")
        elif kind == "parquet":
            yield from _parquet_rows(path, column)
        else:
            yield from _jsonl_records(path, field)
    except UnicodeDecodeError as exc:
        where = _first_invalid_line(path) or repr(str(path))
        raise UserError(f"input {where} is not UTF-8 text ({exc.reason}); convert it to UTF-8") from None


def _first_invalid_line(path: Path) -> str | None:
    """`'FILE' line N` of the first line that is not UTF-8 (read again only once decoding failed), or None."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return f"{str(path)!r} line {n}"
    except OSError:
        return None
    return None


def text_pieces(texts: Iterable[str], *, line_by_line: bool, chunk_chars: int) -> Iterator[Piece]:
    """Pieces of in-memory texts: each a sample (line_by_line), or a document cut like a file's."""
    for text in texts:
        if not isinstance(text, str):
            raise UserError(f"texts must be strings, got {type(text).__name__}")
        if line_by_line:
            if text.strip():
                yield text, True
        else:
            blocks = (text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars))
            yield from document_pieces(blocks, chunk_chars)


def document_pieces(blocks: Iterable[str], chunk_chars: int) -> Iterator[Piece]:
    """Join `blocks` of one document and re-cut them at safe places into pieces of about `chunk_chars` or more.

    A document that is only whitespace yields nothing.
    """
    carry, started = "", False
    for block in blocks:
        carry += block
        if len(carry) > chunk_chars:
            cut = _safe_cut(carry)
            if cut:
                yield carry[:cut], False
                carry, started = carry[cut:], True
    if started or carry.strip():
        yield carry, True


def _safe_cut(text: str) -> int | None:
    """The last position to cut `text` without changing its tokens (see the module docstring), or None."""
    for sep, before_ok in (("\n", 1), (" ", 0)):
        pos = text.rfind(sep, 0, len(text) - 1)
        while pos > 0:
            # "\n": cut after it; " ": cut before it. Both need a non-space on either side.
            cut = pos + before_ok
            if not text[pos - 1].isspace() and not text[pos + 1].isspace():
                return cut
            pos = text.rfind(sep, 0, pos)
    return None


@contextmanager
def _open_text(path: Path, newline: str | None = None):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig", newline=newline) as f:  # -sig: a leading BOM is dropped
        yield f


def _text_lines(path: Path) -> Iterator[Piece]:
    """line_by_line: every non-blank line is a sample, the first one included (a text file has no header)."""
    with _open_text(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if line.strip():
                yield line, True


def _pick_column(path: Path, names: list[str], column: str | None) -> int:
    if column is None:
        if len(names) == 1:
            return 0
        raise UserError(f"input {str(path)!r} has columns {', '.join(names)}; choose the text column with --column")
    if column not in names:
        hint = "" if input_kind(path) == "parquet" else " (the first row of a CSV file is its header)"
        raise UserError(f"column {column!r} is not in {str(path)!r}; its columns are: {', '.join(names)}{hint}")
    return names.index(column)


def _csv_rows(path: Path, column: str | None, delimiter: str) -> Iterator[Piece]:
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # a document per cell may be large; the default 128 KiB limit would refuse it
    try:
        with _open_text(path, newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                return
            col = _pick_column(path, header, column)
            for row in reader:
                if not row:
                    continue
                if len(row) <= col:
                    raise UserError(
                        f"{path}:{reader.line_num}: the row has {len(row)} fields but the header has {len(header)}"
                    )
                if row[col].strip():
                    yield row[col], True
    finally:
        csv.field_size_limit(limit)


def _parquet_column(path: Path, column: str | None) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"input {str(path)!r} is not a readable Parquet file ({exc})") from None
    name = schema.names[_pick_column(path, schema.names, column)]
    kind = schema.field(name).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise UserError(f"column {name!r} of {str(path)!r} holds {kind}, not text; choose a text column with --column")
    return name


def _parquet_rows(path: Path, column: str | None) -> Iterator[Piece]:
    import pyarrow.parquet as pq

    name = _parquet_column(path, column)
    row = 0
    with pq.ParquetFile(path) as pf:
        for batch in pf.iter_batches(batch_size=1024, columns=[name]):
            try:
                texts = batch.column(0).to_pylist()
            except UnicodeDecodeError as exc:
                bad = next(i for i in range(batch.num_rows) if not _decodes(batch.column(0)[i]))
                raise UserError(
                    f"{path} row {row + bad}: column {name!r} is not valid UTF-8 ({exc.reason}); fix the file"
                ) from None
            for text in texts:
                if text and text.strip():
                    yield text, True
            row += batch.num_rows


def _decodes(value) -> bool:
    try:
        value.as_py()
    except UnicodeDecodeError:
        return False
    return True


def _jsonl_records(path: Path, field: str | None) -> Iterator[Piece]:
    if not field:
        raise UserError(f"input {str(path)!r} is JSONL: pass --field, the key that holds the text")
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                msg = f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object"
                raise UserError(msg) from None
            if not isinstance(record, dict) or field not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise UserError(f"{path}:{lineno}: no field {field!r} (keys: {keys}); name the text's key with --field")
            text = record[field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: field {field!r} is a {type(text).__name__}, not a string")
            if (err := unicode_error(text)) is not None:
                raise UserError(f"{path}:{lineno}: field {field!r} is not valid Unicode ({err}); fix the line")
            if text.strip():
                yield text, True
