"""Generate one shard: read its rows, generate, write `part-NNNNN.parquet` atomically, record it as done.

This is the whole per-shard job and it runs without Ray: the Ray actor only loads the engine once and
calls `run_shard` for each shard it pulls.
"""

from __future__ import annotations

import os
import socket
import time

from ..generation.params import SamplingParams
from ..generation.seeds import SEED_MAX, derive_seed, sample_seed
from ..storage import Location, open_parquet
from .manifest import part_name, write_done

BASE_FIELDS = [
    ("sample_index", "int32"),
    ("prompt", "string"),
    ("seed", "int64"),
    ("text", "string"),
    ("num_prompt_tokens", "int32"),
    ("num_generated_tokens", "int32"),
    ("finish_reason", "string"),
    ("error", "string"),
]


def output_schema(job: dict):
    """The explicit schema of every result shard: id, the generation fields, then the kept columns."""
    import pyarrow as pa

    cols = job["identity"]["columns"]
    fields = [pa.field("id", pa.int64() if job["id_type"] == "int" else pa.string(), nullable=False)]
    fields += [pa.field(name, getattr(pa, t)()) for name, t in BASE_FIELDS]
    kept = keep_schema(job)
    fields += [kept.field(c) for c in cols["keep"]]
    return pa.schema(fields, metadata={"aitextgen_batch.fingerprint": job["identity"]["model_fingerprint"]})


def keep_schema(job: dict):
    """The input types of the kept columns, stored in the manifest as a serialized Arrow schema."""
    import base64

    import pyarrow as pa

    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(job["keep_schema"])))


def read_rows(job: dict, shard: dict) -> dict[str, list]:
    """The shard's input rows as columns of Python values, plus `_id` (given or derived from file and row)."""
    import pyarrow as pa

    cols = job["identity"]["columns"]
    wanted = [cols["prompt"]] + ([cols["id"]] if job["has_id"] else []) + ([cols["seed"]] if cols["seed"] else [])
    wanted += [c for c in cols["keep"] if c not in wanted]
    tables, ids = [], []
    for fi, start, end in shard["segments"]:
        f = job["files"][fi]
        pf = open_parquet(f["path"])
        md = pf.metadata
        groups, offset, first = [], 0, None
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if offset < end and offset + n > start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        t = pf.read_row_groups(groups, columns=wanted).slice(start - first, end - start)
        tables.append(t)
        if not job["has_id"]:
            ids.extend(f"{f['name']}:{i}" for i in range(start, end))
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    out = {c: table.column(c).to_pylist() for c in wanted}
    out["_id"] = out[cols["id"]] if job["has_id"] else ids
    return out


def _prompt_error(p) -> str | None:
    if p is None:
        return "prompt is null"
    if not isinstance(p, str):
        return f"prompt must be a string, got {type(p).__name__}"
    if not p.strip():
        return "prompt is empty"
    return None


def run_shard(engine, job: dict, shard_index: int, batch_size: int) -> dict:
    """Generate shard `shard_index` of `job` and record it as done; returns the completion record."""
    import pyarrow as pa

    t0 = time.perf_counter()
    out = Location(job["output"])
    shard = job["shards"][shard_index]
    ident = job["identity"]
    cols = ident["columns"]
    params = SamplingParams(**{**ident["sampling"], "num_return_sequences": 1})
    k_samples = ident["sampling"]["num_return_sequences"]
    rows = read_rows(job, shard)
    n = shard["rows"]

    # One work item per (row, sample): each has its own seed, so no sample depends on another.
    items, errors = [], {}
    for r in range(n):
        err = _prompt_error(rows[cols["prompt"]][r])
        col_seed = rows[cols["seed"]][r] if cols["seed"] else None
        if err is None and cols["seed"] and (col_seed is None or not 0 <= col_seed <= SEED_MAX):
            err = f"seed must be an integer in [0, 2**63-1], got {col_seed!r}"
        for k in range(k_samples):
            if cols["seed"]:
                seed = sample_seed(col_seed, k) if err is None else 0
            else:
                seed = derive_seed(ident["job_seed"], rows["_id"][r], k)
            if err is not None:
                errors[len(items)] = err
            items.append((r, k, seed))
    todo = [i for i in range(len(items)) if i not in errors]
    results = engine.generate(
        [rows[cols["prompt"]][items[i][0]] for i in todo], [items[i][2] for i in todo], params, batch_size
    )
    by_item = dict(zip(todo, results, strict=True))

    data: dict[str, list] = {name: [] for name in ["id"] + [f for f, _ in BASE_FIELDS] + list(cols["keep"])}
    tokens = n_err = 0
    for i, (r, k, seed) in enumerate(items):
        res = by_item.get(i)
        prompt = rows[cols["prompt"]][r]
        data["id"].append(rows["_id"][r])
        data["sample_index"].append(k)
        data["prompt"].append(prompt if isinstance(prompt, str) else None if prompt is None else str(prompt))
        data["seed"].append(seed)
        if res is None or res.error:
            n_err += 1
            data["text"].append("")
            data["num_prompt_tokens"].append(res.num_prompt_tokens if res else 0)
            data["num_generated_tokens"].append(0)
            data["finish_reason"].append("error")
            data["error"].append(errors.get(i) or res.error)
        else:
            tokens += res.num_generated_tokens
            data["text"].append(res.text)
            data["num_prompt_tokens"].append(res.num_prompt_tokens)
            data["num_generated_tokens"].append(res.num_generated_tokens)
            data["finish_reason"].append(res.finish_reason)
            data["error"].append(None)
        for c in cols["keep"]:
            data[c].append(rows[c][r])
    table = pa.Table.from_pydict(data, schema=output_schema(job))
    out.write_parquet(table, part_name(shard_index))
    record = {
        "shard": shard_index,
        "file": part_name(shard_index),
        "rows_in": n,
        "rows_out": table.num_rows,
        "tokens": tokens,
        "errors": n_err,
        "seconds": round(time.perf_counter() - t0, 3),
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    write_done(out, shard_index, record)
    return record
