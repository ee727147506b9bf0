"""`RayExecutor`: one actor per GPU (or per CPU) loads the engine once (`GenerationWorker`) and pulls shards.

A small scheduler of our own instead of Ray Data or `ActorPool`: submit one group per idle actor, `ray.wait`, and on
`RayActorError` (the actor's process died) put the group back in the queue; Ray restarts the actor (`max_restarts`),
and once it answers `ready` again it keeps pulling. Ray Data's actor pools can hang on a dead actor and
`ActorPool.map_unordered` re-raises actor errors, which is why this exists.

An actor whose process died is not an actor that cannot start: while Ray restarts it, calls to it fail at once
("The actor is restarting"), so `ready` is asked again until it answers, for at most `restart_timeout` seconds.
Only an actor whose constructor raised (the model did not load) is dropped at once.
"""

from __future__ import annotations

import os
import time
from collections import deque

from ...errors import UserError, first_line
from ...generation.options import EngineConfig
from ..manifest import JobSpec
from .base import Resources, ShardExecutor, run_group
from .queue import ShardQueue

STARTUP_TIMEOUT_S = 1800.0  # no actor up after this long (model load included): the cluster cannot place them
RESTART_TIMEOUT_S = 600.0  # an actor whose process died and that Ray has not brought back after this long is dropped
RESTART_POLL_S = 0.5  # how often a restarting actor is asked `ready` again

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


def storage_runtime_env() -> dict | None:
    """The Ray `runtime_env` that gives actors the object-store settings (`STORAGE_ENV`) this driver was given."""
    env = {k: os.environ[k] for k in STORAGE_ENV if k in os.environ}
    return {"env_vars": env} if env else None


class GenerationWorker:
    """Body of the Ray actor: the engine is built once in `__init__`, then `run` is called per group of shards.

    The actor's process is an entry point, so it sets the process-wide state itself (transformers' logging, torch's
    threads). The job travels with each call (as one object-store reference), so an actor that Ray restarts after
    its process died needs nothing but its constructor's `EngineConfig`.
    """

    def __init__(self, config: EngineConfig):
        self.engine = config.build_in_worker()

    def ready(self) -> str:
        """Answered once the engine is loaded: the scheduler hands shards only to actors that answered."""
        return self.engine.fingerprint

    def run(self, job: JobSpec, shards: list[int], batch_size: int) -> list:
        return run_group(self.engine, job, shards, batch_size)


class RayExecutor(ShardExecutor):
    """Ray actors, placed from the cluster's resources and the flags; joins Ray on entering (`connect_ray`) and shuts
    down a Ray it started on exit.

    Args:
        address: the Ray address (None: $RAY_ADDRESS, else a local Ray).
        num_actors, gpus_per_actor, threads: the flags (None: decided from the cluster, `_place`).
    """

    def __init__(
        self,
        address: str | None,
        num_actors: int | None,
        gpus_per_actor: float | None,
        threads: int | None,
        *,
        batch_size: int,
        max_attempts: int,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        restart_timeout: float = RESTART_TIMEOUT_S,
    ):
        super().__init__(batch_size=batch_size, max_attempts=max_attempts)
        self.address, self.num_actors, self.gpus_per_actor, self.threads = address, num_actors, gpus_per_actor, threads
        self.startup_timeout, self.restart_timeout = startup_timeout, restart_timeout
        self._started = False

    @property
    def local_memory(self) -> bool:
        """Whether the actors run on this machine (a Ray this driver starts)."""
        from ...raycluster import ray_address

        return ray_address(self.address) == "local"

    def __enter__(self) -> RayExecutor:
        from ...raycluster import connect_ray

        self._started = connect_ray(self.address)
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            import ray

            ray.shutdown()

    def _place(self) -> Resources:
        """How many actors, with what, from the cluster's resources and the flags.

        Raises:
            UserError: more actors than the cluster can place (they would never start), or GPUs the cluster lacks.
        """
        import ray

        from ..cost import device_type

        res = ray.cluster_resources()
        cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
        gpa = self.gpus_per_actor if self.gpus_per_actor is not None else (1.0 if gpus else 0.0)
        if gpa > 0:
            if gpus == 0:
                raise UserError("--gpus-per-actor asks for GPUs but the Ray cluster has none; pass --gpus-per-actor 0")
            fits = int(gpus / gpa)
            n = self.num_actors or max(1, fits)
            if n > fits:
                raise UserError(
                    f"--num-actors {n} x --gpus-per-actor {gpa:g} needs {n * gpa:g} GPUs but the Ray cluster has "
                    f"{gpus}; pass --num-actors {max(1, fits)} or fewer"
                )
            cpa = max(1.0, min(4.0, cpus / n))
            return Resources(n, cpa, gpa, int(self.threads or cpa), "cuda", device_type("cuda", res))
        # One single-threaded actor per CPU: measured faster than fewer actors with more threads each
        # (jobs/benchmark_ray.py: 2 actors x 1 thread beat 1 actor x 2 threads by 1.4x on 2 CPUs). Threads stay 1
        # unless --threads says otherwise, whatever --num-actors is: a CPU matmul may split its sums across threads, so
        # the thread count can change a row's last bits, and the actor count must not.
        n = self.num_actors or max(1, cpus)
        if n > cpus:
            raise UserError(
                f"--num-actors {n} needs at least {n} CPUs (one each) but the Ray cluster has {cpus}: the rest would "
                f"never start. Pass --num-actors {cpus} or fewer, or use a larger cluster (--address)"
            )
        threads = int(self.threads or 1)
        return Resources(n, float(min(threads, max(1, cpus // n))), 0.0, threads, "cpu")

    def _execute(self, job: JobSpec, config: EngineConfig, workers: int, queue: ShardQueue) -> None:
        res = self.resources()
        actors = start_actors(config, workers, res.cpus_per_actor, res.gpus_per_actor)
        try:
            self._schedule(actors, job, queue)
        finally:
            stop_actors(actors)

    def _schedule(self, actors: list, job: JobSpec, queue: ShardQueue) -> None:
        """Hand groups to actors until the queue is empty.

        A group goes only to an actor that has answered `ready` (its model is loaded): an actor Ray has not placed or
        not (re)started is never waited on with work. An actor whose process died is asked `ready` again until Ray has
        restarted it (`note` says so), and dropped only when it is not back after `restart_timeout` seconds or its
        constructor raised. If no actor is up after `startup_timeout` seconds, or every actor is dropped, the shards
        left are failed with the reason.
        """
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        job_ref = ray.put(job)
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
                inflight[actors[a].run.remote(job_ref, group, self.batch_size)] = (a, group)
            now = time.monotonic()
            for a, at in list(ask_again.items()):
                if now >= at:
                    del ask_again[a]
                    starting[actors[a].ready.remote()] = a
            stalled = not idle and not inflight and not ask_again
            if stalled and (not starting or now - since > self.startup_timeout):
                reason = "; ".join(sorted(set(dead.values()))) or (
                    f"no actor started within {self.startup_timeout:.0f} s: the Ray cluster cannot place them "
                    "(see --num-actors, --gpus-per-actor)"
                )
                queue.fail_all(f"no actor to run it: {reason}")
                break
            refs = [*inflight, *starting]
            if refs:
                ready, _ = ray.wait(refs, num_returns=1, timeout=0.5)
            else:  # only restarting actors: wait for the next time to ask them
                ready = []
                time.sleep(max(0.0, min(ask_again.values()) - now))
            self.tick()
            for ref in ready:
                if ref in starting:
                    a = starting.pop(ref)
                    try:
                        ray.get(ref)
                    except (RayActorError, RayTaskError) as exc:
                        if isinstance(exc, RayActorError) and not exc.actor_init_failed:
                            # the process died or Ray is restarting it ("The actor is restarting"): not a failed start
                            down = restarting.setdefault(a, time.monotonic())
                            if time.monotonic() - down < self.restart_timeout:
                                ask_again[a] = time.monotonic() + RESTART_POLL_S
                                continue
                            del restarting[a]
                            waited = f"{self.restart_timeout:.0f} s"
                            dead[a] = f"actor {a} did not come back within {waited}: {first_line(exc)}"
                        else:  # the constructor raised: the model did not load, and will not on a retry
                            restarting.pop(a, None)
                            dead[a] = f"actor failed to start: {first_line(exc)}"
                        self.note(f"dropping actor {a}: {dead[a]}")
                        continue
                    up.add(a)
                    self._outcome.actors = len(up)
                    self.loaded()
                    idle.append(a)
                    since = time.monotonic()
                    if a in restarting:
                        back = time.monotonic() - restarting.pop(a)
                        self.note(f"actor {a} is back after {back:.1f} s and takes shards again")
                    continue
                a, group = inflight.pop(ref)
                try:
                    queue.finished(ray.get(ref))
                    idle.append(a)
                    continue
                except RayActorError as exc:  # the process died (killed, OOM, ...): Ray restarts it
                    self._outcome.actor_restarts += 1
                    restarting[a] = time.monotonic()
                    starting[actors[a].ready.remote()] = a  # work again once it is back
                    error = f"actor died while generating: {first_line(exc)}"
                    self.note(
                        f"actor {a} died while generating shard(s) {', '.join(map(str, group))} "
                        f"({first_line(exc)[:120]}); Ray is restarting it (waiting up to {self.restart_timeout:.0f} s "
                        "for it); each shard is retried unless it failed --max-shard-attempts times"
                    )
                except RayTaskError as exc:
                    idle.append(a)
                    error = first_line(exc.cause if getattr(exc, "cause", None) else exc)
                queue.group_failed(group, error)


def start_actors(config: EngineConfig, num_actors: int, cpus_per_actor: float, gpus_per_actor: float) -> list:
    """Start the actors; each loads the model in its constructor (`_schedule` waits for each to be ready)."""
    import ray

    actor_cls = ray.remote(GenerationWorker).options(
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        max_restarts=-1,
        max_task_retries=0,
        runtime_env=storage_runtime_env(),
    )
    return [actor_cls.remote(config) for _ in range(num_actors)]


def stop_actors(actors: list) -> None:
    import ray

    for actor in actors:
        ray.kill(actor, no_restart=True)
