"""The job folder: `_job.json` (plan, config, provenance, shard states), `_done/` completion records,
`.tmp/` for files being written, and `part-NNNNN.parquet` result shards.

Readers (pandas, pyarrow, polars, DuckDB, HF datasets) skip names starting with `_` or `.`, so reading
OUT gives exactly the result rows. A shard counts as done only when its completion record exists, and
the record is written after the shard file is complete under its final name.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from ..errors import UserError

JOB_FILE = "_job.json"
DONE_DIR = "_done"
TMP_DIR = ".tmp"
FORMAT = "aitextgen-batch/job/v1"


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def write_json_atomic(path: Path, data) -> None:
    """Write JSON through a temporary name and a rename: a reader sees the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def tmp_path(out: Path, final_name: str) -> Path:
    d = out / TMP_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{final_name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"


def read_job(out: Path) -> dict | None:
    p = out / JOB_FILE
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{p} is not valid JSON ({exc}); remove it or pass --overwrite") from None


def done_record(out: Path, shard: int) -> dict | None:
    """The completion record of `shard`, or None when the shard is not (fully) done."""
    p = out / DONE_DIR / f"{shard:05d}.json"
    if not p.exists() or not (out / part_name(shard)).exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def write_done(out: Path, shard: int, record: dict) -> None:
    write_json_atomic(out / DONE_DIR / f"{shard:05d}.json", record)


def clean_tmp(out: Path) -> int:
    """Remove leftovers of interrupted writes; returns how many were removed."""
    d = out / TMP_DIR
    n = 0
    if d.exists():
        for f in d.iterdir():
            f.unlink(missing_ok=True)
            n += 1
    for f in out.glob(f".{JOB_FILE}.*.tmp"):
        f.unlink(missing_ok=True)
        n += 1
    return n


def wipe(out: Path) -> None:
    """--overwrite: remove what a previous job wrote into OUT (and nothing else)."""
    for f in out.glob("part-*.parquet"):
        f.unlink()
    for name in (DONE_DIR, TMP_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / JOB_FILE).unlink(missing_ok=True)


def check_compatible(old: dict, identity: dict, out: Path) -> None:
    """Refuse to resume into OUT when the job there was made with another model, params, inputs or plan."""
    if old.get("format") != FORMAT:
        raise UserError(f"{out / JOB_FILE} has format {old.get('format')!r}, not {FORMAT!r}; pass --overwrite")
    before = old.get("identity", {})
    diffs = [k for k in sorted(set(before) | set(identity)) if before.get(k) != identity.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {before.get(k)!r} -> {identity.get(k)!r}" for k in diffs[:4])
        raise UserError(
            f"{out} holds a job made with a different {', '.join(diffs)} ({detail}). Use a new "
            "--output, or pass --overwrite to delete its results and start again"
        )
