"""`ShardExecutor`: run a job's pending shards on workers that each hold the job's engine.

The rule of a run is written here once: shards are handed out in groups (`queue.ShardQueue`), a failed shard is
retried until `max_attempts`, then marked failed; each finished shard is recorded and shown (`JobProgress`), and
`_job.json` is saved once the first worker has loaded and then as shards finish (`cost.Meter.due`), so a killed run
still counts its devices. An implementation only says where the workers are and how a group reaches one:
`local.LocalExecutor` (this process) and `ray.RayExecutor` (Ray actors).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ...storage import Location
from .. import manifest as mf
from ..manifest import DoneRecord, JobSpec
from .queue import ShardQueue


@dataclass
class Resources:
    """Where a job's workers run and what each holds."""

    num_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int  # torch CPU threads per worker
    device: str  # "cuda" or "cpu"
    device_type: str = "cpu"  # for the job's cost: "cpu", or "cuda" with the accelerator type ("cuda:H100")

    @property
    def devices(self) -> float:
        """What the workers hold, in the units of `--price-per-hour`: GPUs, or CPU cores for a CPU job."""
        per = self.gpus_per_actor if self.device == "cuda" else self.cpus_per_actor
        return self.num_actors * (per or (1.0 if self.device == "cuda" else self.threads))


@dataclass
class Outcome:
    """What a run produced: each shard's done record (None: not done), the shards failed for good (shard -> error),
    how many were done before the run, and the workers' counters."""

    records: dict[int, DoneRecord | None]
    skipped: int
    failed: dict[int, str] = field(default_factory=dict)
    actors: int = 0  # workers that loaded the engine
    actor_restarts: int = 0
    retries: int = 0


def run_group(engine, job: JobSpec, shards: list[int], batch_size: int) -> list:
    """`shard.run_shards` on a worker's engine, once it is known to hold the job's model.

    Raises:
        RuntimeError: the engine's model fingerprint is not the job's (the model files differ between nodes).
    """
    from ..shard import run_shards

    want = job.identity.model_fingerprint
    if engine.fingerprint != want:
        raise RuntimeError(
            f"model fingerprint {engine.fingerprint} on this worker differs from the "
            f"job's {want}: the model files differ between nodes"
        )
    return run_shards(engine, job, shards, batch_size)


class ShardExecutor:
    """Runs a job's shards; a context manager (an implementation may join a cluster on entering, leave on exit).

    Subclasses give `resources()` and `_execute(job, config, workers, queue)`, which starts `workers` workers that
    each build `config`'s engine, calls `loaded()` when the first is ready, hands every group `queue.take` gives to a
    worker and reports its outcome (`queue.finished`, or `queue.group_failed` with the error), and stops them.
    """

    # Whether the workers share this machine's memory (the driver then checks that the KV cache fits).
    local_memory = True

    def __init__(self, *, batch_size: int, max_attempts: int):
        self.batch_size, self.max_attempts = batch_size, max_attempts
        self._resources: Resources | None = None

    def __enter__(self) -> ShardExecutor:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def resources(self) -> Resources:
        """Where the workers run (decided once, then the same)."""
        if self._resources is None:
            self._resources = self._place()
        return self._resources

    def _place(self) -> Resources:
        raise NotImplementedError

    def _execute(self, job: JobSpec, config, workers: int, queue: ShardQueue) -> None:
        raise NotImplementedError

    def run(self, job: JobSpec, config, pending: list[int], outcome: Outcome, progress, meter) -> None:
        """Run `pending` shards of `job` until each is done or has failed `max_attempts` times.

        Args:
            config: the `EngineConfig` every worker builds (`JobSpec.engine_config`).
            outcome: filled in: records of the shards done, shards failed, the workers' counters.
            progress: the `JobProgress` shown; `meter`: the `cost.Meter` of this session's devices.
        """
        self._job, self._out, self._outcome = job, Location(job.output), outcome
        self._progress, self._meter, self._loaded = progress, meter, False
        res = self.resources()
        workers = min(res.num_actors, len(pending))
        queue = ShardQueue(job, pending, self.max_attempts, self._done, self._fail)
        meter.start(dataclasses.replace(res, num_actors=workers).devices)
        try:
            self._execute(job, config, workers, queue)
        finally:
            meter.stop()
            outcome.retries = queue.retries

    def loaded(self) -> None:
        """The first worker has loaded the engine: save `_job.json`, so that the devices held while it loaded count
        even if the run is killed before its first shard."""
        if not self._loaded:
            self._loaded = True
            self._meter.update()
            mf.write_job(self._out, self._job)

    def note(self, message: str) -> None:
        """A line about the workers (one died, is back, was dropped)."""
        self._progress.note(message)

    def tick(self) -> None:
        self._progress.tick()

    def _done(self, record: DoneRecord) -> None:
        self._outcome.records[record.shard] = record
        self._progress.shard_done(record)
        if self._meter.due():  # a killed run's devices count too
            mf.write_job(self._out, self._job)

    def _fail(self, shard: int, error: str) -> None:
        self._outcome.failed[shard] = error
        self._progress.shard_failed(shard, error)
