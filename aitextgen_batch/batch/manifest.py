"""The job folder: `_job.json` (plan, config, provenance, shard states), `_done/` completion records,
`.tmp/` for files being written (local disk only), and `part-NNNNN.parquet` result shards.

Readers (pandas, pyarrow, polars, DuckDB, HF datasets) skip names starting with `_` or `.`, so reading
OUT gives exactly the result rows. A shard counts as done only when its completion record exists, and
the record is written after the shard file is complete under its final name (locally through a rename,
on object stores by one atomic PUT).
"""

from __future__ import annotations

import json

from ..errors import UserError
from ..storage import Location

JOB_FILE = "_job.json"
DONE_DIR = "_done"
TMP_DIR = ".tmp"
FORMAT = "aitextgen-batch/job/v1"


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def write_job(out: Location, job: dict) -> None:
    out.write_text(json.dumps(job, indent=1, sort_keys=True), JOB_FILE)


def read_job(out: Location) -> dict | None:
    if not out.exists(JOB_FILE):
        return None
    try:
        return json.loads(out.read_text(JOB_FILE))
    except json.JSONDecodeError as exc:
        raise UserError(f"{out.uri_of(JOB_FILE)} is not valid JSON ({exc}); remove it or pass --overwrite") from None


def done_record(out: Location, shard: int, names: set[str] | None = None) -> dict | None:
    """The completion record of `shard`, or None when the shard is not (fully) done.

    `names`: the files in OUT, when the caller listed them already (one listing instead of two lookups).
    """
    rec = f"{DONE_DIR}/{shard:05d}.json"
    if names is not None:
        if rec not in names or part_name(shard) not in names:
            return None
    elif not out.exists(rec) or not out.exists(part_name(shard)):
        return None
    try:
        return json.loads(out.read_text(DONE_DIR, f"{shard:05d}.json"))
    except (json.JSONDecodeError, OSError):
        return None


def write_done(out: Location, shard: int, record: dict) -> None:
    out.write_text(json.dumps(record, sort_keys=True), DONE_DIR, f"{shard:05d}.json")


def clean_tmp(out: Location) -> int:
    """Remove leftovers of interrupted local writes; returns how many were removed."""
    leftovers = out.list(TMP_DIR) + out.list(pattern=".*.tmp") + out.list(DONE_DIR, pattern=".*.tmp")
    for name in leftovers:
        out.delete(name)
    return len(leftovers)


def wipe(out: Location) -> None:
    """--overwrite: remove what a previous job wrote into OUT (and nothing else)."""
    for name in out.list(pattern="part-*.parquet"):
        out.delete(name)
    for name in (DONE_DIR, TMP_DIR, JOB_FILE):
        out.delete(name)


def check_compatible(old: dict, identity: dict, out: Location) -> None:
    """Refuse to resume into OUT when the job there was made with another model, params, inputs or plan."""
    if old.get("format") != FORMAT:
        raise UserError(f"{out.uri_of(JOB_FILE)} has format {old.get('format')!r}, not {FORMAT!r}; pass --overwrite")
    before = old.get("identity", {})
    diffs = [k for k in sorted(set(before) | set(identity)) if before.get(k) != identity.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {before.get(k)!r} -> {identity.get(k)!r}" for k in diffs[:4])
        raise UserError(
            f"{out} holds a job made with a different {', '.join(diffs)} ({detail}). Use a new "
            "--output, or pass --overwrite to delete its results and start again"
        )
