"""A job's state in its output folder: what is left to do when a run starts (`prepare_output`), and each shard's state
and the summary recorded in `_job.json` when it ends (`finish`)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

from ...errors import UserError
from ...storage import Location
from .. import manifest as mf
from ..manifest import DoneRecord, JobSpec
from .base import Outcome

log = logging.getLogger("aitextgen_batch")


@dataclass
class JobSummary:
    """What `generate_dataset` returns (and `_job.json` stores as `summary`). Reads as a mapping too: `s["rows"]`."""

    status: str  # complete | failed | incomplete
    output: str
    shards: int
    shards_done: int
    shards_skipped: int
    shards_failed: int
    rows: int
    error_rows: int
    tokens: int  # generated tokens (each row's, the final eos included)
    prompt_tokens: int  # prompt tokens of the generated rows (each sample's prompt counts)
    tokens_per_second: float
    seconds: float  # this run's wall time
    actors: int
    actor_restarts: int
    retries: int
    # what the job cost, over every run of it (`cost.summary_fields`)
    wall_seconds: float
    sessions: int
    device_seconds: dict[str, float]  # device type -> devices x seconds held
    tokens_per_device_hour: float
    price_per_hour: float | None
    cost_usd: float | None
    usd_per_million_tokens: float | None  # per million generated tokens
    failed: dict[str, str] = field(default_factory=dict)  # shard -> error ("all" when every row is an error row)

    def __getitem__(self, key: str):
        return getattr(self, key)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def prepare_output(
    job: JobSpec, out: Location, t0: float, staged: dict[int, str], overwrite: bool = False
) -> tuple[list[int], int, dict[int, DoneRecord | None]]:
    """Check or create OUT, clean leftovers, write the manifest, copy the Parquet copies of JSONL inputs (`staged`:
    file index -> local file) into OUT/_inputs/ when shards are left to do; returns (pending shards, skipped, done
    records).

    A finished shard is trusted only when its part file has the size and sha256 its record states.

    Raises:
        UserError: OUT holds files that are not this job's, or a job made differently that finished shards (and no
            `overwrite`).
    """
    old = mf.read_job(out)
    # checked before anything is deleted or written: --overwrite removes a job's files, never someone else's
    foreign = mf.foreign_files(out, len(old.shards) if old is not None else 0)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise UserError(
            f"--output {out} holds files that are not this job's ({', '.join(foreign[:5])}{more}): readers of the "
            "folder (pandas, pyarrow, DuckDB, ...) would read them as result rows. Use a new or empty --output, or "
            "move them away"
        )
    if old is not None and overwrite:
        mf.wipe(out)
        old = None
    if old is not None:
        try:
            mf.check_compatible(old, job.identity, out)
        except UserError:
            if out.list(mf.DONE_DIR, pattern="*.json"):
                raise
            # A job that finished no shard (refused, failed or stopped before its first) has no rows to mix with:
            # the corrected rerun starts again instead of being refused.
            log.warning("%s holds a job made differently that finished no shard: starting again", out)
            mf.wipe(out)
            old = None
    if old is not None:
        job.created = old.created or t0
        job.sessions = old.sessions + job.sessions
    out.mkdir()
    cleaned = mf.clean_tmp(out)
    if cleaned:
        log.warning("removed %d leftover temporary files from an interrupted run", cleaned)
    job.created = job.created or t0
    job.status = "running"
    mf.write_job(out, job)
    sizes = out.sizes(recursive=True)
    records = {s.shard: mf.done_record(out, s.shard, sizes) for s in job.shards}
    redo = [s for s, r in records.items() if r is None and mf.done_name(s) in sizes]
    if redo:
        log.warning("%d finished shard(s) no longer match their records (changed or damaged): redoing them", len(redo))
        for s in redo:
            out.delete(mf.done_name(s))
    pending = [s for s, r in records.items() if r is None]
    if pending:
        for i, local in staged.items():
            out.put_file(local, mf.staged_name(i))
    return pending, len(job.shards) - len(pending), records


def finish(
    job: JobSpec, out: Location, outcome: Outcome, t0: float, progress, price_per_hour: float | None = None
) -> JobSummary:
    """Record each shard's state and the summary (with what the job cost, over all its runs) in `_job.json`; a job
    whose every row failed is not complete."""
    from ..cost import summary_fields

    records, failed = outcome.records, outcome.failed
    for s in job.shards:
        rec = records.get(s.shard)
        s.state = "done" if rec else "failed" if s.shard in failed else "pending"
        if rec:
            s.rows_out, s.tokens, s.errors, s.seconds = rec.rows_out, rec.tokens, rec.errors, rec.seconds
        s.error = failed.get(s.shard)
    done = [r for r in records.values() if r]
    tokens = sum(r.tokens for r in done)
    summary = JobSummary(
        status="incomplete",
        output=out.uri,
        shards=len(job.shards),
        shards_done=len(done),
        shards_skipped=outcome.skipped,
        shards_failed=len(failed),
        rows=sum(r.rows_out for r in done),
        error_rows=sum(r.errors for r in done),
        tokens=tokens,
        prompt_tokens=sum(r.prompt_tokens or 0 for r in done),
        tokens_per_second=round(progress.session_tokens / max(progress.elapsed, 1e-9), 1),
        seconds=round(time.time() - t0, 2),
        actors=outcome.actors,
        actor_restarts=outcome.actor_restarts,
        retries=outcome.retries,
        **summary_fields(job.sessions, tokens, price_per_hour),
        failed={str(k): v for k, v in failed.items()},
    )
    if len(done) == len(job.shards):
        summary.status = "complete"
        if summary.rows and summary.error_rows == summary.rows:
            first = next((r.first_error for r in done if r.first_error), None)
            summary.status = "failed"
            summary.failed["all"] = f"every one of the {summary.rows} rows is an error row; the first: {first}"
    elif failed:
        summary.status = "failed"
    job.status = summary.status
    job.summary = summary.to_json()
    job.failed = summary.failed
    mf.write_job(out, job)
    progress.summary(summary)
    return summary
