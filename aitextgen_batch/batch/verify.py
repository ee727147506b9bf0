"""Reproducibility checks on a finished job: replay one row, or re-generate a random sample of rows."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..config import check, check_range
from ..errors import UserError
from ..storage import Location
from . import manifest as mf


def load_job(output: str | Path) -> dict:
    job = mf.read_job(Location(output))
    if job is None:
        raise UserError(f"{output} holds no job (no {mf.JOB_FILE}); pass the --output folder of a generate run")
    return job


def job_engine(job: dict, model: str | None = None, threads: int | None = None):
    """The job's engine, rebuilt with the same numerics; `model` may point at a moved copy of the model."""
    import torch

    from ..generation.options import EngineConfig
    from .api import engine_options

    opts = engine_options(job["model"], job["identity"]["engine"], threads)
    if opts["device"] == "cuda" and not torch.cuda.is_available():
        raise UserError("this job ran on CUDA; replaying it needs a CUDA device (results are exact per device kind)")
    if model:
        opts["model"] = model
    engine = EngineConfig(**opts).build()
    want = job["identity"]["model_fingerprint"]
    if engine.fingerprint != want:
        raise UserError(
            f"model {opts['model']!r} has fingerprint {engine.fingerprint}, but the job was made with "
            f"{want}; pass --model with the job's model"
        )
    return engine


def regenerate(engine, job: dict, rows: list[dict]):
    """Re-generate result rows from their stored prompt and seed (each seed is that sample's own)."""
    from ..generation.params import SamplingParams

    params = SamplingParams(**{**job["identity"]["sampling"], "num_return_sequences": 1})
    return engine.generate([r["prompt"] for r in rows], [r["seed"] for r in rows], params, batch_size=len(rows))


def same(row: dict, res) -> bool:
    return (
        row["text"].encode() == res.text.encode()
        and row["finish_reason"] == res.finish_reason
        and row["num_generated_tokens"] == res.num_generated_tokens
    )


def _parts(out: Location) -> list[str]:
    return out.list(pattern="part-*.parquet")


def _read(out: Location, part: str, **kwargs):
    import pyarrow.parquet as pq

    return pq.read_table(out.path(part), filesystem=out.fs, **kwargs)


def find_row(out: Location, job: dict, item_id: str, sample_index: int) -> dict:
    value = int(item_id) if job["id_type"] == "int" else str(item_id)
    for part in _parts(out):
        t = _read(out, part, filters=[("id", "=", value), ("sample_index", "=", sample_index)])
        if t.num_rows:
            return t.to_pylist()[0]
    raise UserError(f"no row with id {item_id!r} and sample_index {sample_index} in {out}")


def replay_row(
    output: str | Path, item_id: str, sample_index: int = 0, model: str | None = None, threads: int | None = None
):
    """Regenerate one row alone; returns (stored row, new result or None for error rows, match)."""
    out = Location(output)
    job = load_job(output)
    row = find_row(out, job, item_id, sample_index)
    if row["finish_reason"] == "error":
        return row, None, True
    res = regenerate(job_engine(job, model, threads), job, [row])[0]
    return row, res, same(row, res)


def verify_output(
    output: str | Path, sample: int = 100, seed: int = 0, model: str | None = None, threads: int | None = None
) -> dict:
    """Check exactly-once over all rows, then re-generate `sample` random rows and compare them byte for byte."""
    out = Location(output)
    job = load_job(output)
    parts = _parts(out)
    keys: set = set()
    dupes = total = 0
    counts = []
    for p in parts:
        t = _read(out, p, columns=["id", "sample_index", "finish_reason"])
        counts.append(t.num_rows)
        for i, k in zip(t.column("id").to_pylist(), t.column("sample_index").to_pylist(), strict=True):
            total += 1
            if (i, k) in keys:
                dupes += 1
            keys.add((i, k))
    expected = sum(r for _, r in job["identity"]["inputs"]) * job["identity"]["sampling"]["num_return_sequences"]
    # Sample among non-error rows (error rows carry no generated text to compare).
    rng = random.Random(seed)
    candidates = []
    for p, n in zip(parts, counts, strict=True):
        candidates.extend((p, i) for i in range(n))
    rng.shuffle(candidates)
    chosen, by_part = [], {}
    for p, i in candidates:
        if len(chosen) >= sample:
            break
        if p not in by_part:
            by_part[p] = _read(out, p).to_pylist()
        row = by_part[p][i]
        if row["finish_reason"] != "error":
            chosen.append(row)
    mismatches = []
    if chosen:
        results = regenerate(job_engine(job, model, threads), job, chosen)
        mismatches = [r["id"] for r, res in zip(chosen, results, strict=True) if not same(r, res)]
    return {
        "rows": total,
        "expected_rows": expected,
        "duplicates": dupes,
        "missing": max(0, expected - len(keys)),
        "checked": len(chosen),
        "mismatches": len(mismatches),
        "mismatch_rate": len(mismatches) / len(chosen) if chosen else 0.0,
        "mismatched_ids": mismatches[:20],
    }


@dataclass
class VerifyConfig:
    """Re-generate random rows of a finished job and compare them byte for byte; check exactly-once."""

    output: str = field(default="", metadata={"help": "the job's output folder"})
    sample: int = field(default=100, metadata={"help": "rows to re-generate, >= 1"})
    seed: int = field(default=0, metadata={"help": "which rows are sampled"})
    model: str | None = field(default=None, metadata={"help": "the job's model, if it moved"})
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})

    def __post_init__(self):
        check(bool(self.output), "output", "is required")
        check_range("sample", self.sample, 1)


def run_verify(cfg: VerifyConfig) -> int:
    from ..models.info import print_table

    report = verify_output(cfg.output, cfg.sample, cfg.seed, cfg.model, cfg.threads)
    print_table({k: v for k, v in report.items() if k != "mismatched_ids"}, title="verify")
    ok = report["mismatches"] == 0 and report["duplicates"] == 0 and report["missing"] == 0
    if report["mismatched_ids"]:
        print(f"mismatched ids: {report['mismatched_ids']}")
    print("OK: every sampled row matches byte for byte" if ok else "FAILED")
    return 0 if ok else 1
