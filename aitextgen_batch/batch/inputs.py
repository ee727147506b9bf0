"""Input discovery and validation: every file's schema and every id is checked before anything starts."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..storage import Location, expand_inputs, file_digest, glob_matches, open_parquet, split_glob
from .manifest import Columns, InputFile, part_name, staged_name


@dataclass
class InputCheck:
    """What `validate_inputs` found: the files in order, column types, and how rows are identified."""

    files: list[InputFile]
    types: dict  # column name -> pyarrow DataType (prompt, id, seed and kept columns)
    has_id: bool  # the id column exists (else ids are `file:row`)
    id_type: str  # "int" or "string"
    root: str  # the folder input names are relative to
    staged: dict[int, str] = field(default_factory=dict)  # file index -> local Parquet copy of a JSONL file

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def parquet(self, index: int) -> str:
        """The Parquet file holding file `index`'s rows (its local copy, for a JSONL file)."""
        return self.staged.get(index) or self.files[index].path


def _open(path: str, name: str | None = None):
    import pyarrow as pa

    try:
        return open_parquet(path)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(
            f"{name or path}: not a readable Parquet file ({type(exc).__name__}: {exc}); fix or remove it from --input"
        ) from exc


def id_key(value) -> str:
    """The canonical text of an id, for hashing and for `replay --id`."""
    return str(value)


def _flags(columns: Columns) -> dict[str, str]:
    """Input column -> the flag that names it, for the columns every file must have."""
    named = {c: "--keep-columns" for c in columns.keep}
    if columns.seed:
        named[columns.seed] = "--seed-column"
    if columns.params:
        named[columns.params] = "--params-column"
    if columns.messages:
        named[columns.messages] = "--messages-column"
    # OpenAI requests have both: a chat request its messages, a completion its prompt
    if not columns.messages or columns.error:
        named[columns.prompt] = "--prompt-column"
    if columns.error:
        named[columns.error] = "--input-format"
    return named


def validate_inputs(
    spec: str, columns: Columns, staging: Path | None = None, stage_requests: Callable | None = None
) -> InputCheck:
    """Check every file before anything starts.

    Checks: at least one file and one row; readable Parquet, or JSONL whose every line is an object with values of
    the right kinds (`jsonl.stage_jsonl` writes its Parquet copy into `staging`); the prompt column holds text (or
    the messages column holds chat messages, the params column sampling fields) and it, the seed and the kept
    columns exist in every file with one type; ids are valid and unique across all files. Ids are checked through
    8-byte digests so the driver's memory holds 8 bytes per row, not the ids themselves.

    `stage_requests(path, dest)`: the input is one OpenAI batch file, read and staged by it (`openai_batch.requests`).

    Raises:
        UserError: naming the file (and row or line) at fault and the flag to change.
    """
    import pyarrow as pa

    from .jsonl import is_jsonl, stage_jsonl

    paths, root = expand_inputs(spec, ("*.parquet", "*.jsonl"))
    if not paths:
        raise UserError(
            f"--input {spec!r} matches no Parquet files and no JSONL files (a folder is searched for *.parquet and "
            "*.jsonl; a glob must match files): check the path or pattern"
        )
    if stage_requests is not None and (len(paths) != 1 or not is_jsonl(paths[0])):
        raise UserError(
            f"--input {spec!r}: --input-format openai-batch reads one request file (.jsonl, one request per line), "
            f"got {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}; pass one file"
        )
    id_column = columns.id
    files: list[InputFile] = []
    staged: dict[int, str] = {}
    types: dict[str, pa.DataType] = {}
    use_id = None
    flags = _flags(columns)
    for path in paths:
        read = path
        if is_jsonl(path):
            if staging is None:
                raise UserError(f"{path}: JSONL input needs a staging folder (pass `staging`)")
            read = str(staging / f"{len(files):05d}.parquet")
            (stage_requests or partial(stage_jsonl, columns=columns))(path, Path(read))
            staged[len(files)] = read
        pf = _open(read, path)
        schema = pf.schema_arrow
        names = set(schema.names)
        for col, flagname in flags.items():
            if col not in names:
                raise UserError(f"{path}: no column {col!r} ({flagname}); its columns are: {', '.join(schema.names)}")
        has_id = id_column is not None and id_column in names
        if use_id is None:
            use_id = has_id
        elif use_id != has_id:
            raise UserError(
                f"{path}: id column {id_column!r} is present in some input files but not in this one; "
                "give every file the column, or none (ids then derive from file name and row)"
            )
        for col in list(flags) + ([id_column] if has_id else []):
            t = schema.field(col).type
            if col in types and types[col] != t and not (_stringy(t) and _stringy(types[col])):
                raise UserError(
                    f"{path}: column {col!r} has type {t}, but earlier files have {types[col]}; make the types agree"
                )
            types.setdefault(col, t)
        _check_types(path, columns, types)
        name = path[len(root) :].lstrip("/") if path.startswith(root + "/") else path.rsplit("/", 1)[-1]
        size, sha256 = file_digest(path)  # the job's identity holds each input's contents, not only its name
        files.append(InputFile(path, name, pf.metadata.num_rows, bytes=size, sha256=sha256))
    check = InputCheck(files, types, bool(use_id), "string", root, staged)
    if use_id:
        _check_unique_ids(check, id_column)
    if use_id and not (pa.types.is_integer(types[id_column]) or _stringy(types[id_column])):
        raise UserError(f"id column {id_column!r} has type {types[id_column]}; ids must be integers or strings")
    check.id_type = "int" if use_id and pa.types.is_integer(types[id_column]) else "string"
    if check.rows == 0:
        raise UserError(f"--input {spec!r} holds no rows ({len(files)} input file(s), all empty): nothing to do")
    return check


def _check_types(path: str, columns: Columns, types: dict) -> None:
    """The prompt (or messages), seed and params columns hold what they must."""
    import pyarrow as pa

    from ..generation.params import SamplingParams

    if columns.messages:
        t = types[columns.messages]
        item = t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) else None
        chat_shape = item is not None and pa.types.is_struct(item) and {"role", "content"} <= set(item.names)
        if not (_stringy(t) or chat_shape):
            raise UserError(
                f"{path}: the messages column {columns.messages!r} (--messages-column) holds {t}; it must hold "
                "list<struct<role: string, content: string>> (chat messages) or JSON text of such a list"
            )
    elif not _stringy(types[columns.prompt]):
        raise UserError(
            f"{path}: the prompt column {columns.prompt!r} (--prompt-column) holds {types[columns.prompt]}, not "
            "text; pass the column that holds the prompts as strings"
        )
    if columns.seed and not pa.types.is_integer(types[columns.seed]):
        raise UserError(f"{path}: --seed-column {columns.seed!r} must hold integers, it has type {types[columns.seed]}")
    if columns.params:
        t = types[columns.params]
        known = {f.name for f in dataclasses.fields(SamplingParams)}
        if pa.types.is_struct(t):
            unknown = [n for n in t.names if n not in known]
            if unknown:
                raise UserError(
                    f"{path}: the params column {columns.params!r} (--params-column) has field(s) {unknown}, which are "
                    f"not sampling fields; the fields are: {', '.join(known)}"
                )
        elif not _stringy(t):
            raise UserError(
                f"{path}: the params column {columns.params!r} (--params-column) holds {t}; it must be a struct of "
                "sampling fields or JSON text of an object of them"
            )


def check_output_apart(output: str, spec: str, check: InputCheck) -> None:
    """Refuse an OUT inside the input folder (a rerun would read its own results as prompts) or holding an input.

    Raises:
        UserError: naming both paths.
    """
    out = Location(output).uri.rstrip("/")
    root = check.root.rstrip("/")
    if _reads_output(spec, root, out):
        raise UserError(
            f"--output {output!r} is inside --input {spec!r}: a rerun would read its own results as input. "
            "Choose an --output outside the input folder"
        )
    for f in check.files:
        uri = Location(f.path).uri
        if uri == out or uri.startswith(out + "/"):
            raise UserError(
                f"--input file {f.path} lies inside --output {output!r}: results would be read as prompts. "
                "Choose an --output apart from the inputs"
            )


def _reads_output(spec: str, root: str, out: str) -> bool:
    """Whether a rerun of `--input spec` (its files under `root`) would read result files written into `out`."""
    if out != root and not out.startswith(root + "/"):
        return False
    _, pattern = split_glob(spec)
    if pattern is None:  # a folder is searched recursively; a single file reads only itself
        return Location(spec).is_dir()
    inside = out[len(root) :].strip("/")
    results = [part_name(0), staged_name(0)]  # where a job writes Parquet files in OUT
    return any(glob_matches(f"{inside}/{name}".lstrip("/"), pattern) for name in results)


def _stringy(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _texts(col, path: str, offset: int, what: str) -> list:
    """A string column's values; a value that is not valid UTF-8 is a UserError naming the file and row."""
    import pyarrow as pa

    try:
        return col.to_pylist()
    except UnicodeDecodeError:
        for i, raw in enumerate(col.cast(pa.large_binary()).to_pylist()):
            try:
                raw is None or raw.decode()
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{path} row {offset + i}: {what} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                    "fix the file"
                ) from exc
        raise


def _digests(values) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(id_key(v).encode(), digest_size=8).digest(), "big") for v in values],
        dtype=np.uint64,
    )


def _check_unique_ids(check: InputCheck, id_column: str) -> None:
    chunks = []
    for i, f in enumerate(check.files):
        offset = 0
        for batch in _open(check.parquet(i), f.path).iter_batches(columns=[id_column], batch_size=65536):
            col = batch.column(0)
            values = _texts(col, f.path, offset, f"the id (--id-column {id_column!r})")
            if col.null_count:
                row = offset + values.index(None)
                raise UserError(f"{f.path} row {row}: the id (--id-column {id_column!r}) is null; every row needs one")
            chunks.append(_digests(values))
            offset += len(values)
    allh = np.concatenate(chunks) if chunks else np.zeros(0, np.uint64)
    s = np.sort(allh)
    dup_h = set(s[1:][s[1:] == s[:-1]].tolist())
    if not dup_h:
        return
    # Name the real duplicates (a digest collision alone is not a duplicate).
    seen: dict[str, tuple[str, int]] = {}
    for i, f in enumerate(check.files):
        offset = 0
        for batch in _open(check.parquet(i), f.path).iter_batches(columns=[id_column], batch_size=65536):
            vals = batch.column(0).to_pylist()
            for j, (v, h) in enumerate(zip(vals, _digests(vals).tolist(), strict=True)):
                if h in dup_h:
                    k = id_key(v)
                    if k in seen:
                        raise UserError(
                            f"duplicate id {v!r}: {seen[k][0]} row {seen[k][1]} and {f.path} row "
                            f"{offset + j}; ids (--id-column {id_column!r}) must be unique"
                        )
                    seen[k] = (f.path, offset + j)
            offset += len(vals)
