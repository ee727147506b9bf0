"""The Ray layer: one actor per GPU (or per few CPUs) loads the engine once and pulls shards.

A small scheduler of our own instead of Ray Data or `ActorPool`: submit one shard per idle actor,
`ray.wait`, and on `RayActorError` (the actor's process died) put the shard back in the queue; Ray
restarts the actor (`max_restarts`), and once it answers `ready` again it keeps pulling. Ray Data's actor
pools can hang on a dead actor and `ActorPool.map_unordered` re-raises actor errors, which is why this exists.

An actor whose process died is not an actor that cannot start: while Ray restarts it, calls to it fail at once
("The actor is restarting"), so `ready` is asked again until it answers, for at most `restart_timeout` seconds.
Only an actor whose constructor raised (the model did not load) is dropped at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import first_line
from ..generation.options import EngineConfig
from .manifest import DoneRecord, JobSpec

STARTUP_TIMEOUT_S = 1800.0  # no actor up after this long (model load included): the cluster cannot place them
RESTART_TIMEOUT_S = 600.0  # an actor whose process died and that Ray has not brought back after this long is dropped
RESTART_POLL_S = 0.5  # how often a restarting actor is asked `ready` again


@dataclass
class RunStats:
    """Counters of one `run_shards` call."""

    actor_restarts: int = 0
    retries: int = 0
    actors_started: int = 0


class GenerationWorker:
    """Body of the Ray actor: the engine is built once in `__init__`, then `run` is called per shard.

    The actor's process is an entry point, so it sets the process-wide state itself (transformers' logging, torch's
    threads). The job travels with each call (as one object-store reference), so an actor that Ray restarts after
    its process died needs nothing but its constructor arguments.
    """

    def __init__(self, config: EngineConfig):
        import torch

        from ..models.loading import quiet_transformers

        quiet_transformers()
        if config.threads:
            torch.set_num_threads(config.threads)
        self.engine = config.build()

    def ready(self) -> str:
        """Answered once the engine is loaded: the scheduler hands shards only to actors that answered."""
        return self.engine.fingerprint

    def run(self, job: JobSpec, shards: list[int], batch_size: int) -> list:
        return _run_checked(self.engine, job, shards, batch_size)


def _run_checked(engine, job: JobSpec, shards: list[int], batch_size: int) -> list:
    """`run_shards`, once the engine is known to hold the job's model."""
    from .shard import run_shards

    want = job.identity.model_fingerprint
    if engine.fingerprint != want:
        raise RuntimeError(
            f"model fingerprint {engine.fingerprint} on this worker differs from the "
            f"job's {want}: the model files differ between nodes"
        )
    return run_shards(engine, job, shards, batch_size)


# Shards given to an actor at once when they are small: until their items fill the slots this many times over.
GROUP_FILL = 2
MAX_GROUP = 64


class ShardQueue:
    """The shards left to run, how they are grouped, and what happens when one fails: written once for the Ray
    scheduler and the in-process runner.

    A group is one shard, or as many small ones as fill an actor's slots `GROUP_FILL` times (a shard of 16 rows on 64
    slots would leave three quarters of every decode step empty), but no more than a fair share of what is queued among
    the actors (a small job still runs on every actor), and at most `MAX_GROUP` shards. A shard that failed is retried
    alone, until it has failed `max_attempts` times; when a whole group fails (its engine call raised, its actor
    died), its shards are retried alone without counting that attempt against any one of them.
    """

    def __init__(self, job: JobSpec, pending: list[int], max_attempts: int, on_done, on_fail, stats: RunStats):
        self.job, self.queue = job, deque(pending)
        self.max_attempts, self.on_done, self.on_fail, self.stats = max_attempts, on_done, on_fail, stats
        self.attempts: dict[int, int] = {}
        self.solo: set[int] = set()

    def __bool__(self) -> bool:
        return bool(self.queue)

    def take(self, actors: int = 1) -> list[int]:
        per_row = self.job.identity.sampling.num_return_sequences
        queued = sum(self.job.shards[s].rows for s in self.queue) * per_row
        want = min(GROUP_FILL * self.job.identity.engine.slots, -(-queued // max(1, actors)))
        group, items = [], 0
        while self.queue and len(group) < MAX_GROUP and (not group or items < want):
            if group and self.queue[0] in self.solo:
                break
            s = self.queue.popleft()
            group.append(s)
            items += self.job.shards[s].rows * per_row
            if s in self.solo:
                break
        return group

    def finished(self, outcomes: list) -> None:
        """Record a group's outcomes: done records, or a shard's own failure."""
        from .shard import ShardFailure

        for outcome in outcomes:
            if isinstance(outcome, ShardFailure):
                self.failed(outcome.shard, outcome.error)
            else:
                self.on_done(outcome)

    def failed(self, shard: int, error: str) -> None:
        self.attempts[shard] = self.attempts.get(shard, 0) + 1
        if self.attempts[shard] >= self.max_attempts:
            self.on_fail(shard, f"failed {self.attempts[shard]} times; last error: {error}")
        else:
            self.stats.retries += 1
            self.solo.add(shard)
            self.queue.appendleft(shard)

    def group_failed(self, group: list[int], error: str) -> None:
        if len(group) == 1:
            self.failed(group[0], error)
            return
        for s in reversed(group):
            self.solo.add(s)
            self.queue.appendleft(s)


def start_actors(config: EngineConfig, num_actors: int, cpus_per_actor: float, gpus_per_actor: float) -> list:
    """Start the actors; each loads the model in its constructor (`run_shards` waits for each to be ready)."""
    import ray

    env = storage_env()
    actor_cls = ray.remote(GenerationWorker).options(
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        max_restarts=-1,
        max_task_retries=0,
        runtime_env={"env_vars": env} if env else None,
    )
    return [actor_cls.remote(config) for _ in range(num_actors)]


# Object-store settings the driver was given travel to the actors.
STORAGE_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_PROFILE",
    "AITEXTGEN_BATCH_CACHE",
)


def storage_env() -> dict[str, str]:
    import os

    return {k: os.environ[k] for k in STORAGE_ENV if k in os.environ}


def stop_actors(actors: list) -> None:
    import ray

    for actor in actors:
        ray.kill(actor, no_restart=True)


def run_shards(
    actors: list,
    job: JobSpec,
    pending: list[int],
    *,
    batch_size: int,
    max_attempts: int,
    on_done: Callable[[DoneRecord], None],
    on_fail: Callable[[int, str], None],
    on_tick: Callable[[], None] | None = None,
    on_note: Callable[[str], None] | None = None,
    startup_timeout: float = STARTUP_TIMEOUT_S,
    restart_timeout: float = RESTART_TIMEOUT_S,
) -> RunStats:
    """Run `pending` shards on `actors` until each is done or has failed `max_attempts` times.

    A shard goes only to an actor that has answered `ready` (its model is loaded): an actor Ray has not placed or
    not (re)started is never waited on with work. An actor whose process died is asked `ready` again until Ray has
    restarted it (`on_note` says so), and dropped only when it is not back after `restart_timeout` seconds or its
    constructor raised. If no actor is up after `startup_timeout` seconds, or every actor is dropped, the shards
    left are failed with the reason.
    """
    import time

    import ray
    from ray.exceptions import RayActorError, RayTaskError

    note = on_note or (lambda message: None)
    job_ref = ray.put(job)
    stats = RunStats()
    queue = ShardQueue(job, pending, max_attempts, on_done, on_fail, stats)
    starting = {actors[a].ready.remote(): a for a in range(len(actors))}
    idle: deque[int] = deque()
    inflight: dict = {}
    dead: dict[int, str] = {}
    restarting: dict[int, float] = {}  # actor -> when its process died (or its start was interrupted)
    ask_again: dict[int, float] = {}  # restarting actor -> when to ask `ready` again
    up: set[int] = set()  # actors that answered `ready` at least once
    since = time.monotonic()
    while queue or inflight:
        while idle and queue:
            a, group = idle.popleft(), queue.take(len(actors) - len(dead))
            inflight[actors[a].run.remote(job_ref, group, batch_size)] = (a, group)
        now = time.monotonic()
        for a, at in list(ask_again.items()):
            if now >= at:
                del ask_again[a]
                starting[actors[a].ready.remote()] = a
        stalled = not idle and not inflight and not ask_again
        if stalled and (not starting or now - since > startup_timeout):
            reason = "; ".join(sorted(set(dead.values()))) or (
                f"no actor started within {startup_timeout:.0f} s: the Ray cluster cannot place them "
                "(see --num-actors, --gpus-per-actor)"
            )
            while queue:
                on_fail(queue.queue.popleft(), f"no actor to run it: {reason}")
            break
        refs = [*inflight, *starting]
        if refs:
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.5)
        else:  # only restarting actors: wait for the next time to ask them
            ready = []
            time.sleep(max(0.0, min(ask_again.values()) - now))
        if on_tick:
            on_tick()
        for ref in ready:
            if ref in starting:
                a = starting.pop(ref)
                try:
                    ray.get(ref)
                except (RayActorError, RayTaskError) as exc:
                    if isinstance(exc, RayActorError) and not exc.actor_init_failed:
                        # the process died or Ray is restarting it ("The actor is restarting"): not a failed start
                        down = restarting.setdefault(a, time.monotonic())
                        if time.monotonic() - down < restart_timeout:
                            ask_again[a] = time.monotonic() + RESTART_POLL_S
                            continue
                        del restarting[a]
                        dead[a] = f"actor {a} did not come back within {restart_timeout:.0f} s: {first_line(exc)}"
                    else:  # the constructor raised: the model did not load, and will not on a retry
                        restarting.pop(a, None)
                        dead[a] = f"actor failed to start: {first_line(exc)}"
                    note(f"dropping actor {a}: {dead[a]}")
                    continue
                up.add(a)
                stats.actors_started = len(up)
                idle.append(a)
                since = time.monotonic()
                if a in restarting:
                    note(f"actor {a} is back after {time.monotonic() - restarting.pop(a):.1f} s and takes shards again")
                continue
            a, group = inflight.pop(ref)
            try:
                queue.finished(ray.get(ref))
                idle.append(a)
                continue
            except RayActorError as exc:  # the process died (killed, OOM, ...): Ray restarts it
                stats.actor_restarts += 1
                restarting[a] = time.monotonic()
                starting[actors[a].ready.remote()] = a  # work again once it is back
                error = f"actor died while generating: {first_line(exc)}"
                shards = ", ".join(map(str, group))
                note(
                    f"actor {a} died while generating shard(s) {shards} ({first_line(exc)[:120]}); Ray is restarting "
                    f"it (waiting up to {restart_timeout:.0f} s for it); each shard is retried unless it failed "
                    "--max-shard-attempts times"
                )
            except RayTaskError as exc:
                idle.append(a)
                error = first_line(exc.cause if getattr(exc, "cause", None) else exc)
            queue.group_failed(group, error)
    return stats


def run_shards_here(
    config: EngineConfig,
    job: JobSpec,
    pending: list[int],
    *,
    batch_size: int,
    max_attempts: int,
    on_done: Callable[[DoneRecord], None],
    on_fail: Callable[[int, str], None],
) -> RunStats:
    """`run_shards` without Ray (`--in-process`): this process loads the engine and runs the shards one group after
    another (`take_group`), with the same retries. torch's thread count is set to the job's for the run (it is part of
    a CPU job's numerics) and restored after."""
    from ..models.loading import torch_threads

    stats = RunStats()
    with torch_threads(config.threads):
        engine = config.build()
        stats.actors_started = 1
        queue = ShardQueue(job, pending, max_attempts, on_done, on_fail, stats)
        while queue:
            group = queue.take()
            try:
                outcomes = _run_checked(engine, job, group, batch_size)
            # A group's failure (the engine raised), whatever its type, as a Ray task error would be: its shards are
            # retried, then failed with the cause in the message (rows' own errors never get here, they are error
            # rows; a shard's own input or output failure is its `ShardFailure`). Ctrl-C (not an Exception) stops.
            except Exception as exc:
                queue.group_failed(group, first_line(exc))
                continue
            queue.finished(outcomes)
    return stats
