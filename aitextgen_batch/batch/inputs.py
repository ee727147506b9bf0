"""Input discovery and validation: every file's schema and every id is checked before any actor starts."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..storage import expand_inputs, open_parquet


@dataclass
class InputFile:
    path: str  # as given/resolved; shards refer to files by index
    name: str  # relative to the input root: used in derived ids
    rows: int


def _open(path: str):
    try:
        return open_parquet(path)
    except Exception as exc:
        raise UserError(
            f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc}); fix or remove it from --input"
        ) from None


def id_key(value) -> str:
    """The canonical text of an id, for hashing and for `replay --id`."""
    return str(value)


def validate_inputs(
    spec: str, prompt_column: str, id_column: str | None, seed_column: str | None, keep_columns: list[str]
):
    """Check every file and return (files, arrow schema of the id/keep columns, id type name).

    Checks: readable Parquet; the prompt column (and seed/keep columns) exist in every file with one type;
    ids are unique across all files. Ids are checked through 8-byte digests so the driver's memory holds
    8 bytes per row, not the ids themselves.
    """
    import pyarrow as pa

    paths, root = expand_inputs(spec)
    files: list[InputFile] = []
    types: dict[str, pa.DataType] = {}
    use_id = None
    for path in paths:
        pf = _open(path)
        schema = pf.schema_arrow
        names = set(schema.names)
        need = [prompt_column] + ([seed_column] if seed_column else []) + list(keep_columns)
        for col in need:
            if col not in names:
                flagname = (
                    "--prompt-column"
                    if col == prompt_column
                    else "--seed-column"
                    if col == seed_column
                    else "--keep-columns"
                )
                raise UserError(f"{path}: no column {col!r} ({flagname}); its columns are: {', '.join(schema.names)}")
        has_id = id_column is not None and id_column in names
        if use_id is None:
            use_id = has_id
        elif use_id != has_id:
            raise UserError(
                f"{path}: id column {id_column!r} is present in some input files but not in this one; "
                "give every file the column, or none (ids then derive from file name and row)"
            )
        for col in need + ([id_column] if has_id else []):
            t = schema.field(col).type
            if col in types and types[col] != t and not (_stringy(t) and _stringy(types[col])):
                raise UserError(
                    f"{path}: column {col!r} has type {t}, but earlier files have {types[col]}; make the types agree"
                )
            types.setdefault(col, t)
        if seed_column and not pa.types.is_integer(types[seed_column]):
            raise UserError(
                f"{path}: --seed-column {seed_column!r} must hold integers, it has type {types[seed_column]}"
            )
        name = path[len(root) :].lstrip("/") if path.startswith(root + "/") else path.rsplit("/", 1)[-1]
        files.append(InputFile(path, name, pf.metadata.num_rows))
    if use_id:
        _check_unique_ids(files, id_column)
    if use_id and not (pa.types.is_integer(types[id_column]) or _stringy(types[id_column])):
        raise UserError(f"id column {id_column!r} has type {types[id_column]}; ids must be integers or strings")
    id_type = "int" if use_id and pa.types.is_integer(types[id_column]) else "string"
    return files, types, bool(use_id), id_type


def _stringy(t) -> bool:
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _digests(values) -> np.ndarray:
    return np.array(
        [int.from_bytes(hashlib.blake2b(id_key(v).encode(), digest_size=8).digest(), "big") for v in values],
        dtype=np.uint64,
    )


def _check_unique_ids(files: list[InputFile], id_column: str) -> None:
    chunks = []
    for f in files:
        for batch in _open(f.path).iter_batches(columns=[id_column], batch_size=65536):
            col = batch.column(0)
            if col.null_count:
                row = col.to_pylist().index(None)
                raise UserError(f"{f.path}: id column {id_column!r} is null in a row near {row}; every row needs an id")
            chunks.append(_digests(col.to_pylist()))
    allh = np.concatenate(chunks) if chunks else np.zeros(0, np.uint64)
    s = np.sort(allh)
    dup_h = set(s[1:][s[1:] == s[:-1]].tolist())
    if not dup_h:
        return
    # Name the real duplicates (a digest collision alone is not a duplicate).
    seen: dict[str, tuple[str, int]] = {}
    for f in files:
        offset = 0
        for batch in _open(f.path).iter_batches(columns=[id_column], batch_size=65536):
            vals = batch.column(0).to_pylist()
            for i, (v, h) in enumerate(zip(vals, _digests(vals).tolist(), strict=True)):
                if h in dup_h:
                    k = id_key(v)
                    if k in seen:
                        raise UserError(
                            f"duplicate id {v!r}: {seen[k][0]} row {seen[k][1]} and {f.path} row "
                            f"{offset + i}; ids (--id-column {id_column!r}) must be unique"
                        )
                    seen[k] = (f.path, offset + i)
            offset += len(vals)
