"""Driver-side progress of a finetune: follows OUTPUT/metrics.csv and samples.jsonl, which rank 0 appends to.

A live bar (step, loss, learning rate, tokens/s, ETA), or with `quiet` a log line every 10 seconds. New samples
are printed as they appear.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def last_row(path: Path) -> dict | None:
    """The last complete row of a CSV being appended to, as a dict (None before the first row)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    if len(lines) < 2:
        return None
    header, last = lines[0].split(","), lines[-1].split(",")
    return dict(zip(header, last)) if len(last) == len(header) else None


class FinetuneProgress:
    """Polls the run's logs in a thread while `trainer.fit()` blocks the main thread."""

    def __init__(self, output: Path, start_step: int, max_steps: int, *, quiet: bool):
        self.metrics, self.samples = output / "metrics.csv", output / "samples.jsonl"
        self.start_step, self.max_steps, self.quiet = start_step, max_steps, quiet
        self._stop = threading.Event()
        self._samples_seen = self._count_samples()
        self._progress = None

    def _count_samples(self) -> int:
        return len(self.samples.read_text().splitlines()) if self.samples.is_file() else 0

    def __enter__(self):
        if not self.quiet:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]finetune"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.max_steps, completed=self.start_step, info="")
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._poll()
        if self._progress:
            self._progress.stop()

    def _print(self, text: str) -> None:
        if self._progress:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=sys.stderr, flush=True)

    def _loop(self) -> None:
        last_line = 0.0
        while not self._stop.wait(0.5):
            row = self._poll()
            if self.quiet and row and time.monotonic() - last_line >= 10:
                last_line = time.monotonic()
                self._print(f"step {row['step']}/{self.max_steps}: {self._info(row)}")

    @staticmethod
    def _info(row: dict) -> str:
        return (
            f"loss {float(row['loss']):.3f}  lr {float(row['learning_rate']):.2e}  "
            f"{float(row['tokens_per_second']):,.0f} tok/s"
        )

    def _poll(self) -> dict | None:
        row = last_row(self.metrics)
        if row and self._progress:
            self._progress.update(self._task, completed=int(row["step"]), info=self._info(row))
        if self.samples.is_file():
            lines = self.samples.read_text().splitlines()
            for line in lines[self._samples_seen :]:
                try:
                    s = json.loads(line)
                except json.JSONDecodeError:  # a line being written: read it next time
                    break
                self._samples_seen += 1
                self._print(f"sample at step {s['step']}: {s['prompt']}{s['text']!r}")
            self._samples_seen = min(self._samples_seen, len(lines))
        return row
