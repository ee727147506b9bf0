"""The Ray layer: one actor per GPU (or per few CPUs) loads the engine once and pulls shards.

A small scheduler of our own instead of Ray Data or `ActorPool`: submit one shard per idle actor,
`ray.wait`, and on `RayActorError` (the actor's process died) put the shard back in the queue; the
actor restarts (`max_restarts`) and keeps pulling. Ray Data's actor pools can hang on a dead actor
and `ActorPool.map_unordered` re-raises actor errors, which is why this exists.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable


class GenerationWorker:
    """Body of the Ray actor: the engine is built once in `__init__`, then `run` is called per shard.

    The job travels with each call (as one object-store reference), so an actor that Ray restarts after
    its process died needs nothing but its constructor arguments.
    """

    def __init__(self, engine_options: dict, threads: int | None):
        import torch

        from ..generation.options import EngineConfig
        from ..models.loading import quiet_transformers

        quiet_transformers()
        if threads:
            torch.set_num_threads(threads)
        self.engine = EngineConfig(**engine_options).build()

    def run(self, job: dict, shard_index: int, batch_size: int) -> dict:
        from .shard import run_shard

        want = job["identity"]["model_fingerprint"]
        if self.engine.fingerprint != want:
            raise RuntimeError(
                f"model fingerprint {self.engine.fingerprint} on this worker differs from the "
                f"job's {want}: the model files differ between nodes"
            )
        return run_shard(self.engine, job, shard_index, batch_size)


def start_actors(
    engine_options: dict, num_actors: int, cpus_per_actor: float, gpus_per_actor: float, threads: int | None
) -> list:
    """Start the actors now: they import torch and load the model while the driver checks inputs."""
    import ray

    env = storage_env()
    actor_cls = ray.remote(GenerationWorker).options(
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
        max_restarts=-1,
        max_task_retries=0,
        runtime_env={"env_vars": env} if env else None,
    )
    return [actor_cls.remote(engine_options, threads) for _ in range(num_actors)]


# Object-store settings the driver was given travel to the actors (which may have been started before them).
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
    job: dict,
    pending: list[int],
    *,
    batch_size: int,
    max_attempts: int,
    on_done: Callable[[dict], None],
    on_fail: Callable[[int, str], None],
    on_tick: Callable[[], None] | None = None,
) -> dict:
    """Run `pending` shards on `actors` until each is done or has failed `max_attempts` times.

    Returns counters: {"actor_restarts": int, "retries": int}.
    """
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    job_ref = ray.put(job)
    queue = deque(pending)
    idle = deque(range(len(actors)))
    inflight: dict = {}
    attempts: dict[int, int] = {}
    stats = {"actor_restarts": 0, "retries": 0}
    while queue or inflight:
        while idle and queue:
            a, s = idle.popleft(), queue.popleft()
            inflight[actors[a].run.remote(job_ref, s, batch_size)] = (a, s)
        ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
        if on_tick:
            on_tick()
        for ref in ready:
            a, s = inflight.pop(ref)
            idle.append(a)
            try:
                on_done(ray.get(ref))
                continue
            except RayActorError as exc:  # the process died (killed, OOM, ...): Ray restarts it
                stats["actor_restarts"] += 1
                error = f"actor died while generating: {_first_line(exc)}"
            except RayTaskError as exc:
                error = _first_line(exc.cause if getattr(exc, "cause", None) else exc)
            attempts[s] = attempts.get(s, 0) + 1
            if attempts[s] >= max_attempts:
                on_fail(s, f"failed {attempts[s]} times; last error: {error}")
            else:
                stats["retries"] += 1
                queue.appendleft(s)
    return stats


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # Ray wraps the remote traceback: its last line is the original exception.
    return (lines[-1] if lines else type(exc).__name__)[:500]
