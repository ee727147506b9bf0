"""Reproducibility checks on a finished job: replay one row, or re-generate a random sample of rows."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..config import check, check_at_most, check_range, check_seed
from ..errors import UserError
from ..storage import Location
from . import manifest as mf
from .manifest import JobSpec
from .schema import PARAMS_FIELD
from .shard import logprob_values

MAX_SAMPLE = 1_000_000


def load_job(output: str | Path) -> JobSpec:
    job = mf.read_job(Location(output))
    if job is None:
        raise UserError(f"{output} holds no job (no {mf.JOB_FILE}); pass the --output folder of a generate run")
    return job


def job_engine(job: JobSpec, model: str | None = None):
    """The job's engine, rebuilt with the same numerics (`JobSpec.engine_config`); `model` may point at a moved copy of
    the model.

    Raises:
        UserError: the job ran on CUDA and this machine has none, it was made by another version of the engine's
            arithmetic, or the model's fingerprint is not the job's.
    """
    import torch

    config = job.engine_config(model)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("this job ran on CUDA; replaying it needs a CUDA device (results are exact per device kind)")
    engine = config.build()
    want = job.identity.model_fingerprint
    if engine.fingerprint != want:
        raise UserError(
            f"model {config.model!r} has fingerprint {engine.fingerprint}, but the job was made with "
            f"{want}; pass --model with the job's model"
        )
    return engine


def row_params(job: JobSpec, row: dict):
    """The params one stored sample was made with: its row's `params` column (per-row params), else the job's."""
    import dataclasses

    from ..generation.params import SamplingParams

    if row.get(PARAMS_FIELD):
        return SamplingParams(**{**json.loads(row[PARAMS_FIELD]), "num_return_sequences": 1})
    return dataclasses.replace(job.identity.sampling, num_return_sequences=1)


def regenerate(engine, job: JobSpec, rows: list[dict], threads: list[int | None] | None = None):
    """Re-generate result rows from their stored prompt, seed (each seed is that sample's own) and params.

    `threads`: per row, torch's CPU thread count its shard ran with (`DoneRecord.threads`). A CPU job's rows are
    re-generated with that count, set for the call and restored after: a CPU matmul splits its sums by thread count,
    so the logits, and the log-probabilities stored from them, are exact only with the count that made them.
    """
    from ..models.loading import torch_threads

    if job.identity.engine.device != "cpu" or threads is None:
        threads = [None] * len(rows)
    results: list = [None] * len(rows)
    for count in sorted(set(threads), key=str):
        idx = [i for i, t in enumerate(threads) if t == count]
        sub = [rows[i] for i in idx]
        params = [row_params(job, r) for r in sub]
        with torch_threads(count):
            got = engine.generate([r["prompt"] for r in sub], [r["seed"] for r in sub], params, batch_size=len(sub))
        for i, res in zip(idx, got, strict=True):
            results[i] = res
    return results


def same(row: dict, res) -> bool:
    """The stored row and a re-generated result agree byte for byte: text, finish, token count, and the
    log-probability columns the row has (token, top and prompt log-probabilities as stored, in float32)."""
    if not (
        row["text"].encode() == res.text.encode()
        and row["finish_reason"] == res.finish_reason
        and row["num_generated_tokens"] == res.num_generated_tokens
        and row.get("valid", res.valid) == res.valid
    ):
        return False
    return all(row[name] == value for name, value in logprob_values(res).items() if name in row)


@dataclass
class PartCheck:
    """The result files of a job, each checked against its completion record (size and sha256)."""

    good: list[str]
    damaged: dict[str, str]  # file -> what is wrong
    records: dict[str, mf.DoneRecord] = field(default_factory=dict)  # good file -> its record


def check_parts(out: Location, job: JobSpec) -> PartCheck:
    """Check every `part-*.parquet` against its shard's completion record before anything reads it."""
    sizes = out.sizes(recursive=True)
    good, damaged, records = [], {}, {}
    for name in sorted(n for n in sizes if n.startswith("part-") and n.endswith(".parquet")):
        shard = int(name[5:10]) if name[5:10].isdigit() else -1
        record = mf.done_record(out, shard, sizes) if 0 <= shard < len(job.shards) else None
        if record is not None:
            good.append(name)
            records[name] = record
        elif mf.done_name(shard) not in sizes:
            damaged[name] = "has no completion record (an interrupted or foreign write)"
        else:
            damaged[name] = "differs from its completion record (size or sha256): truncated or changed after writing"
    return PartCheck(good, damaged, records)


def _read(out: Location, part: str, **kwargs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(out.path(part), filesystem=out.fs, **kwargs)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(
            f"{out.uri_of(part)} is not a readable Parquet file ({exc}); rerun the generate command to redo it"
        ) from exc


def _id_value(job: JobSpec, item_id: str):
    if job.id_type != "int":
        return str(item_id)
    try:
        return int(item_id)
    except ValueError:
        raise UserError(
            f"--id {item_id!r}: this job's ids are integers (column {job.identity.columns.id!r}); pass an integer"
        ) from None


def find_row(out: Location, job: JobSpec, item_id: str, sample_index: int) -> tuple[dict, mf.DoneRecord]:
    """The stored row, and the completion record of its shard."""
    value = _id_value(job, item_id)
    parts = check_parts(out, job)
    for part in parts.good:
        t = _read(out, part, filters=[("id", "=", value), ("sample_index", "=", sample_index)])
        if t.num_rows:
            return t.to_pylist()[0], parts.records[part]
    damaged = f" ({len(parts.damaged)} damaged part file(s) not searched: rerun generate)" if parts.damaged else ""
    raise UserError(f"no row with id {item_id!r} and sample_index {sample_index} in {out}{damaged}")


def replay_row(output: str | Path, item_id: str, sample_index: int = 0, model: str | None = None):
    """Regenerate one row alone; returns (stored row, new result or None for error rows, match)."""
    out = Location(output)
    job = load_job(output)
    row, record = find_row(out, job, item_id, sample_index)
    if row["finish_reason"] == "error":
        return row, None, True
    engine = job_engine(job, model)
    res = regenerate(engine, job, [row], [record.threads])[0]
    return row, res, same(row, res)


def run_replay_row(cfg) -> int:
    """`replay --output OUT --id X`: print the row's regenerated text (or JSON) and whether it matches the stored
    row byte for byte; exit 1 on a mismatch. `cfg` is a `generation.options.ReplayConfig`."""
    import dataclasses
    import json

    row, res, match = replay_row(cfg.output, cfg.id, cfg.sample_index, cfg.engine.model or None)
    if res is None:
        print(f"row {cfg.id!r} sample {cfg.sample_index} is an error row: {row['error']}")
        return 0
    if cfg.json:
        replayed = dataclasses.asdict(res)
        print(json.dumps({"stored": row, "replayed": replayed, "match": match}, ensure_ascii=False, default=str))
    else:
        print(res.text)
        print(f"-- {'MATCH: byte-identical to' if match else 'MISMATCH with'} the stored row", flush=True)
    return 0 if match else 1


def check_inputs(job: JobSpec) -> tuple[dict[str, str], list[str]]:
    """Each input file the job recorded contents for, hashed again: ({file: what changed}, [files no longer found]).

    An input edited since the job read it means the output no longer answers to the input: a rerun would mix rows.
    """
    from ..storage import file_digest

    changed, missing = {}, []
    for f in job.files:
        if f.sha256 is None:  # a job recorded before inputs' contents were part of its identity
            continue
        try:
            size, sha256 = file_digest(f.path)
        except (OSError, UserError):
            missing.append(f.path)
            continue
        if [size, sha256] != [f.bytes, f.sha256]:
            changed[f.path] = (
                f"changed since the job read it ({f.bytes} bytes, sha256 {f.sha256[:12]}... then; {size} bytes, "
                f"sha256 {sha256[:12]}... now)"
            )
    return changed, missing


def verify_output(output: str | Path, sample: int = 100, seed: int = 0, model: str | None = None) -> dict:
    """Check every part file against its record, the inputs against the contents the job read, exactly-once over all
    rows, then re-generate `sample` random rows and compare them byte for byte.

    Exactly-once: every (id, sample_index) once, and each id with samples 0..k-1, where k is its row's
    num_return_sequences (its `params` column's, with per-row params; else the job's). An input row with no output
    row at all counts the job's k as missing.
    """
    out = Location(output)
    job = load_job(output)
    parts = check_parts(out, job)
    inputs_changed, inputs_missing = check_inputs(job)
    keys: set = set()
    dupes = total = 0
    counts = []
    job_k = job.identity.sampling.num_return_sequences
    per_row = job.identity.columns.params is not None
    samples: dict = {}  # id -> its row's number of samples
    k_of: dict = {None: job_k}  # params JSON -> num_return_sequences
    for p in parts.good:
        t = _read(out, p, columns=["id", "sample_index"] + [PARAMS_FIELD] * per_row)
        counts.append(t.num_rows)
        params = t.column(PARAMS_FIELD).to_pylist() if per_row else [None] * t.num_rows
        for i, k, pj in zip(t.column("id").to_pylist(), t.column("sample_index").to_pylist(), params, strict=True):
            total += 1
            if (i, k) in keys:
                dupes += 1
            keys.add((i, k))
            if pj not in k_of:
                k_of[pj] = json.loads(pj)["num_return_sequences"]
            samples.setdefault(i, k_of[pj])
    unexpected = sum(1 for i, k in keys if not 0 <= k < samples[i])
    inputs = sum(entry[1] for entry in job.identity.inputs)
    expected = sum(samples.values()) + max(0, inputs - len(samples)) * job_k
    # Sample among non-error rows (error rows carry no generated text to compare).
    rng = random.Random(seed)
    candidates = []
    for p, n in zip(parts.good, counts, strict=True):
        candidates.extend((p, i) for i in range(n))
    rng.shuffle(candidates)
    chosen, threads, by_part = [], [], {}
    for p, i in candidates:
        if len(chosen) >= sample:
            break
        if p not in by_part:
            by_part[p] = _read(out, p).to_pylist()
        row = by_part[p][i]
        if row["finish_reason"] != "error":
            chosen.append(row)
            threads.append(parts.records[p].threads)
    mismatches = []
    if chosen:
        engine = job_engine(job, model)
        results = regenerate(engine, job, chosen, threads)
        mismatches = [r["id"] for r, res in zip(chosen, results, strict=True) if not same(r, res)]
    return {
        "rows": total,
        "expected_rows": expected,
        "duplicates": dupes,
        "missing": max(0, expected - (len(keys) - unexpected)),
        "unexpected": unexpected,
        "damaged_files": len(parts.damaged),
        "changed_inputs": len(inputs_changed),
        "checked": len(chosen),
        "mismatches": len(mismatches),
        "mismatch_rate": len(mismatches) / len(chosen) if chosen else 0.0,
        "mismatched_ids": mismatches[:20],
        "damaged": parts.damaged,
        "inputs_changed": inputs_changed,
        "inputs_missing": inputs_missing,
    }


@dataclass
class VerifyConfig:
    """Re-generate random rows of a finished job and compare them byte for byte; check exactly-once."""

    output: str = field(default="", metadata={"help": "the job's output folder"})
    sample: int = field(default=100, metadata={"help": "rows to re-generate, >= 1"})
    seed: int = field(default=0, metadata={"help": "which rows are sampled"})
    model: str | None = field(default=None, metadata={"help": "the job's model, if it moved"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads, >= 1"})

    def __post_init__(self):
        check(bool(self.output), "output", "is required")
        check_range("sample", self.sample, 1)
        check_at_most("sample", self.sample, MAX_SAMPLE, " (re-generated rows are held together)")
        check_seed("seed", self.seed)
        if self.threads is not None:
            from ..generation.options import MAX_THREADS

            check_range("threads", self.threads, 1)
            check_at_most("threads", self.threads, MAX_THREADS)


def run_verify(cfg: VerifyConfig) -> int:
    """`verify`: print the report; exit 1 on a mismatch, a duplicate, a missing or unexpected row or a damaged file."""
    from ..console import print_table

    report = verify_output(cfg.output, cfg.sample, cfg.seed, cfg.model)
    details = ("mismatched_ids", "damaged", "inputs_changed", "inputs_missing")
    print_table({k: v for k, v in report.items() if k not in details}, title="verify")
    bad = ("mismatches", "duplicates", "missing", "unexpected", "damaged_files", "changed_inputs")
    ok = not any(report[k] for k in bad)
    if report["mismatched_ids"]:
        print(f"mismatched ids: {report['mismatched_ids']}")
    for name, what in report["damaged"].items():
        print(f"damaged: {name} {what}; rerun the generate command to redo it")
    for name, what in report["inputs_changed"].items():
        print(f"input {name} {what}: the output was made from other rows; rerun generate with --overwrite")
    for name in report["inputs_missing"]:
        print(f"note: input {name} is no longer there; its contents were not checked")
    print("OK: every sampled row matches byte for byte" if ok else "FAILED")
    return 0 if ok else 1
