"""Generate one shard: read its rows, generate, write `part-NNNNN.parquet` atomically, record it as done.

This is the whole per-shard job and it runs without Ray: the Ray actor only loads the engine once and
calls `run_shards` for each group of shards it pulls (one shard, or several small ones together).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass

from ..config import to_dict, unicode_error
from ..errors import first_line
from ..generation.seeds import SEED_MAX, derive_seed, sample_seed
from ..storage import Location, open_parquet
from .manifest import DoneRecord, JobSpec, ShardPlan, part_name, write_done
from .rows import RowWork, prepare_rows
from .schema import BASE_FIELDS, PARAMS_FIELD, PROMPT_FIELD, TOP_FIELD, job_fields, output_schema


def source_columns(job: JobSpec) -> list[str]:
    """The columns a row's prompt comes from: its prompt, its messages, or both (OpenAI requests: one or the other)."""
    cols, chat = job.identity.columns, job.identity.chat
    mode = chat.mode if chat is not None else None
    return {"messages": [cols.messages], "requests": [cols.prompt, cols.messages]}.get(mode, [cols.prompt])


@dataclass
class ShardRows:
    """A shard's input rows: the Arrow table of the wanted columns, each row's id, and where each row came from."""

    table: object  # pyarrow.Table
    ids: list
    origins: list[str]  # "FILE row N", for error messages


def read_rows(job: JobSpec, shard: ShardPlan) -> ShardRows:
    """The shard's input rows (ids given, or derived from file and row)."""
    import pyarrow as pa

    cols = job.identity.columns
    wanted = source_columns(job)
    wanted += ([cols.id] if job.has_id else []) + ([cols.seed] if cols.seed else [])
    wanted += [c for c in [cols.params, cols.error, *cols.keep] if c and c not in wanted]
    tables, origins, derived = [], [], []
    for fi, start, end in shard.segments:
        f = job.files[fi]
        pf = open_parquet(f.parquet)
        md = pf.metadata
        groups, offset, first = [], 0, None
        for g in range(md.num_row_groups):
            n = md.row_group(g).num_rows
            if offset < end and offset + n > start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        tables.append(pf.read_row_groups(groups, columns=wanted).slice(start - first, end - start))
        origins.extend(f"{f.name} row {i}" for i in range(start, end))
        derived.extend(f"{f.name}:{i}" for i in range(start, end))
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    # Given ids were checked (valid UTF-8, unique) before the job started.
    ids = table.column(cols.id).to_pylist() if job.has_id else derived
    return ShardRows(table, ids, origins)


@dataclass
class _Prepared:
    """A shard read and turned into work items: one per (row, sample), each with its own seed."""

    index: int
    rows: ShardRows
    work: RowWork
    items: list[tuple[int, int, int]]  # (row, sample index, seed)
    errors: dict[int, str]  # item -> its row's error (not generated)
    single: list  # each row's params for one sample (None for a row with invalid params)


def _prepare(engine, job: JobSpec, shard_index: int) -> _Prepared:
    return plan_items(job, read_rows(job, job.shards[shard_index]), engine.tokenizer, shard_index)


def plan_items(job: JobSpec, rows: ShardRows, tokenizer, index: int = 0) -> _Prepared:
    """Rows as work items: one per (row, sample), each with its own seed (the row's seed column, else derived from
    the job seed and the row's id), so no sample depends on another. A row makes as many samples as its own params
    ask for (the job's when its params are invalid); a bad row's items carry its error and are not generated."""
    cols = job.identity.columns
    job_k = job.identity.sampling.num_return_sequences
    work = prepare_rows(job, rows.table, rows.origins, tokenizer)
    seeds_col = rows.table.column(cols.seed).to_pylist() if cols.seed else None
    items, errors = [], {}
    for r in range(rows.table.num_rows):
        err = work.errors.get(r)
        col_seed = seeds_col[r] if seeds_col is not None else None  # a null seed derives from the job seed and id
        if err is None and col_seed is not None and not 0 <= col_seed <= SEED_MAX:
            err = f"seed must be an integer in [0, 2**63-1], got {col_seed!r}"
        p = work.params[r]
        for k in range(p.num_return_sequences if p is not None else job_k):
            if col_seed is not None:
                seed = sample_seed(col_seed, k) if err is None else 0
            else:
                seed = derive_seed(job.identity.job_seed, rows.ids[r], k)
            if err is not None:
                errors[len(items)] = err
            items.append((r, k, seed))
    single = [p and dataclasses.replace(p, num_return_sequences=1) for p in work.params]  # one sample per item
    return _Prepared(index, rows, work, items, errors, single)


def generate_items(engine, prepared: list[_Prepared], batch_size: int) -> dict[tuple[int, int], object]:
    """Generate every item of `prepared` that has no error in one engine call; {(index, item): GenerationResult}."""
    todo = [(sh, i) for sh in prepared for i in range(len(sh.items)) if i not in sh.errors]
    results = engine.generate(
        [sh.work.prompts[sh.items[i][0]] for sh, i in todo],
        [sh.items[i][2] for sh, i in todo],
        [sh.single[sh.items[i][0]] for sh, i in todo],
        batch_size,
    )
    return {(sh.index, i): r for (sh, i), r in zip(todo, results, strict=True)}


@dataclass
class ShardFailure:
    """A shard of a group that failed on its own (its input could not be read, its file not written)."""

    shard: int
    error: str


def run_shards(engine, job: JobSpec, shard_indices: list[int], batch_size: int) -> list[DoneRecord | ShardFailure]:
    """Generate several shards of `job` in one engine call, then write and record each as done (one outcome each).

    The engine keeps its slots full across the shards' items (shards smaller than the slots would leave most of
    every decode step empty), and no item's text depends on which items run beside it. A shard whose input cannot be
    read, or whose file cannot be written, fails alone (`ShardFailure`); only an engine failure fails the call. Each
    shard's `seconds` is the call's time, shared out by the shard's items.
    """
    t0 = time.perf_counter()
    shards, outcomes = [], {}
    for s in shard_indices:
        try:
            shards.append(_prepare(engine, job, s))
        except Exception as exc:  # this shard's own input: the others run
            outcomes[s] = ShardFailure(s, first_line(exc))
    by_item = generate_items(engine, shards, batch_size)
    seconds = time.perf_counter() - t0
    total = max(1, sum(len(sh.items) for sh in shards))
    for sh in shards:
        try:
            outcomes[sh.index] = _write(job, sh, by_item, seconds * max(1, len(sh.items)) / total)
        except Exception as exc:
            outcomes[sh.index] = ShardFailure(sh.index, first_line(exc))
    return [outcomes[s] for s in shard_indices]


@dataclass
class ResultTable:
    """A shard's (or batch's) result rows as the output's Arrow table, and their counts."""

    table: object  # pyarrow.Table, schema `output_schema(job)`
    tokens: int
    prompt_tokens: int
    errors: int
    first_error: str | None


def result_table(job: JobSpec, sh: _Prepared, by_item: dict) -> ResultTable:
    """The output rows of `sh`'s items, in item order: a generated item's text and counts, or an error row (its row's
    error, or the engine's for that item); `by_item` as `generate_items` returns it."""
    import pyarrow as pa

    ident = job.identity
    cols = ident.columns
    rows, work, items, errors = sh.rows, sh.work, sh.items, sh.errors
    extra = job_fields(ident)
    data: dict[str, list] = {name: [] for name in ["id"] + [f for f, _ in BASE_FIELDS] + extra}
    tokens = prompt_tokens = n_err = 0
    first_error = None
    params_json: dict[int, str] = {}
    for i, (r, k, seed) in enumerate(items):
        res = by_item.get((sh.index, i))
        prompt = work.prompts[r]
        data["id"].append(rows.ids[r])
        data["sample_index"].append(k)
        data["prompt"].append(_text(prompt if isinstance(prompt, str) else None if prompt is None else str(prompt)))
        data["seed"].append(seed)
        if PARAMS_FIELD in data:
            p = work.params[r]
            if p is not None and r not in params_json:
                params_json[r] = json.dumps(to_dict(p), sort_keys=True)
            data[PARAMS_FIELD].append(params_json.get(r))
        if res is None or res.error:
            n_err += 1
            message = errors.get(i) or res.error
            first_error = first_error or _text(f"{rows.origins[r]}: {message}")
            data["text"].append("")
            data["num_prompt_tokens"].append(res.num_prompt_tokens if res else 0)
            data["num_generated_tokens"].append(0)
            data["finish_reason"].append("error")
            data["error"].append(_text(message))
            data["valid"].append(None)
            for name in extra:
                if name != PARAMS_FIELD:
                    data[name].append(None)
        else:
            tokens += res.num_generated_tokens
            prompt_tokens += res.num_prompt_tokens
            data["text"].append(res.text)
            data["num_prompt_tokens"].append(res.num_prompt_tokens)
            data["num_generated_tokens"].append(res.num_generated_tokens)
            data["finish_reason"].append(res.finish_reason)
            data["error"].append(None)
            data["valid"].append(res.valid)
            for name, value in logprob_values(res).items():
                if name in data:
                    data[name].append(value)
    schema = output_schema(job)
    arrays = [pa.array(data[name], type=schema.field(name).type) for name in data]
    # Kept columns are taken as Arrow values (never decoded), in the input's own type.
    take = pa.array([r for r, _, _ in items], type=pa.int64())
    arrays += [rows.table.column(c).take(take).cast(schema.field(c).type) for c in cols.keep]
    return ResultTable(pa.Table.from_arrays(arrays, schema=schema), tokens, prompt_tokens, n_err, first_error)


def _write(job: JobSpec, sh: _Prepared, by_item: dict, seconds: float) -> DoneRecord:
    """Write a shard's part file (atomically) and its done record."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    out = Location(job.output)
    result = result_table(job, sh, by_item)
    table = result.table
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    blob = sink.getvalue().to_pybytes()
    out.write_bytes(blob, part_name(sh.index))
    record = DoneRecord(
        shard=sh.index,
        file=part_name(sh.index),
        rows_in=job.shards[sh.index].rows,
        rows_out=table.num_rows,
        tokens=result.tokens,
        errors=result.errors,
        seconds=round(seconds, 3),
        host=socket.gethostname(),
        pid=os.getpid(),
        bytes=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        first_error=result.first_error,
        threads=torch.get_num_threads(),
        prompt_tokens=result.prompt_tokens,
    )
    write_done(out, record)
    return record


def _text(value: str | None) -> str | None:
    """Text as the output's string columns can hold it: a lone surrogate (not valid Unicode) becomes its escape."""
    if value is None or unicode_error(value) is None:
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def logprob_values(res) -> dict:
    """A result's log-probability columns, as stored. `token_ids` are the generated tokens with the final eos when the
    row ended with one, as `GenerationResult.token_ids`: `token_ids`, `token_logprobs`, `num_generated_tokens` and
    `top_logprobs` (per position, the K most likely tokens, best first) have one length. A row that did not ask for
    top or prompt log-probabilities holds null there. Log-probabilities are stored as float32, as here."""
    import numpy as np

    top = None
    if res.top_logprobs:
        top = [
            [{"token_id": t, "logprob": v} for t, v in zip(ids, np.asarray(lps, np.float32).tolist(), strict=True)]
            for ids, lps in ([[t for t, _ in pos], [v for _, v in pos]] for pos in res.top_logprobs)
        ]
    prompt = None
    if res.prompt_logprobs:
        prompt = [None] + np.asarray(res.prompt_logprobs[1:], np.float32).tolist()
    return {
        "cumulative_logprob": res.cumulative_logprob,
        "token_ids": res.token_ids,
        "token_logprobs": np.asarray(res.token_logprobs, np.float32).tolist(),
        TOP_FIELD: top,
        PROMPT_FIELD: prompt,
    }
