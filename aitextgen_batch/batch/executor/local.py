"""`LocalExecutor` (`--in-process`): this process is the one worker; it builds the engine once and runs the groups
one after another. No Ray: small jobs, notebooks, debugging, and the tests of the job layer."""

from __future__ import annotations

from ...errors import first_line
from .base import Resources, ShardExecutor, run_group
from .queue import ShardQueue


class LocalExecutor(ShardExecutor):
    """One worker in this process, on its own CUDA device when it has one.

    torch's thread count is set to the job's for the run (it is part of a CPU job's numerics) and restored after.
    """

    def __init__(self, device: str | None, threads: int | None, *, batch_size: int, max_attempts: int):
        super().__init__(batch_size=batch_size, max_attempts=max_attempts)
        self.device, self.threads = device, threads

    def _place(self) -> Resources:
        from ...models.loading import default_device
        from ..cost import device_type

        device = (self.device or default_device()).split(":")[0]
        return Resources(1, 0.0, 0.0, int(self.threads or 1), device, device_type(device))

    def _execute(self, job, config, workers: int, queue: ShardQueue) -> None:
        from ...models.loading import torch_threads

        with torch_threads(config.threads):
            engine = config.build()
            self._outcome.actors = 1
            self.loaded()
            while queue:
                group = queue.take()
                try:
                    outcomes = run_group(engine, job, group, self.batch_size)
                # A group's failure (the engine raised), whatever its type, as a Ray task error would be: its shards
                # are retried, then failed with the cause in the message (rows' own errors never get here, they are
                # error rows; a shard's own input or output failure is its `ShardFailure`). Ctrl-C (not an
                # Exception) stops.
                except Exception as exc:
                    queue.group_failed(group, first_line(exc))
                    continue
                queue.finished(outcomes)
