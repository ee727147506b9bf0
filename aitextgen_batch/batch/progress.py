"""Driver-side progress: a live bar (shards, rows, tokens/s, ETA) or log lines, and the final summary."""

from __future__ import annotations

import logging
import sys
import time

from .manifest import DoneRecord

log = logging.getLogger("aitextgen_batch")


class JobProgress:
    """Tracks shard completions; rates count only work done in this session (not skipped shards)."""

    def __init__(self, shards: int, rows: int, *, quiet: bool, already: list[DoneRecord]):
        self.quiet = quiet
        self.total_shards, self.total_rows = shards, rows
        self.done_shards = len(already)
        self.done_rows = sum(r.rows_in for r in already)
        self.session_tokens = 0
        self.session_rows = 0
        self.t0 = time.perf_counter()
        self._progress = None
        self._task = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __enter__(self):
        if not self.quiet:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]generate"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} shards"),
                TextColumn("{task.fields[rows]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "gen", total=self.total_shards, completed=self.done_shards, rows=self._rows_text(), rate=""
            )
        else:
            log.info("job: %d shards (%d already done), %d rows", self.total_shards, self.done_shards, self.total_rows)
        return self

    def __exit__(self, *exc):
        if self._progress:
            self._progress.stop()

    def _rows_text(self) -> str:
        return f"{self.done_rows:,}/{self.total_rows:,} rows"

    def _rate_text(self) -> str:
        return f"{self.session_tokens / max(self.elapsed, 1e-9):,.0f} tok/s"

    def shard_done(self, rec: DoneRecord) -> None:
        self.done_shards += 1
        self.done_rows += rec.rows_in
        self.session_rows += rec.rows_in
        self.session_tokens += rec.tokens
        if self._progress:
            self._progress.update(
                self._task, completed=self.done_shards, rows=self._rows_text(), rate=self._rate_text()
            )
        else:
            print(
                f"shard {rec.shard:05d} done: {rec.rows_out} rows, {rec.tokens} tokens, "
                f"{rec.seconds:.1f}s ({self.done_shards}/{self.total_shards} shards, {self._rate_text()})",
                file=sys.stderr,
                flush=True,
            )

    def shard_failed(self, shard: int, error: str) -> None:
        msg = f"shard {shard:05d} FAILED: {error}"
        if self._progress:
            self._progress.console.print(f"[red]{msg}")
        else:
            print(msg, file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        """A line about the job's workers (an actor died, is back, was dropped), above the bar."""
        if self._progress:
            self._progress.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)

    def tick(self) -> None:
        if self._progress:
            self._progress.update(self._task, rate=self._rate_text())

    def summary(self, s) -> None:
        """Print a `JobSummary` as a table, then each failed shard's error."""
        from ..console import print_table

        rows = {k: v for k, v in s.to_json().items() if k != "failed"}
        print_table(rows, title="generation summary")
        for shard, err in s.failed.items():
            print(f"failed shard {shard}: {err}", file=sys.stderr)
