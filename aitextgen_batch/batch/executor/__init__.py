"""Executors: one way to run a job's shards (`base.ShardExecutor`: groups, retries, failure marking, progress and
`_job.json` saves), two places to run them: `local.LocalExecutor` (`--in-process`) and `ray.RayExecutor` (Ray actors).
`queue.ShardQueue` holds the retry rule; `state` prepares the output folder and records the outcome."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Outcome, Resources, ShardExecutor

if TYPE_CHECKING:
    from ..api import GenerateConfig

__all__ = ["Outcome", "Resources", "ShardExecutor", "make_executor"]


def make_executor(cfg: GenerateConfig) -> ShardExecutor:
    """The executor a generate job's flags ask for: this process with `--in-process`, else Ray actors."""
    run = {"batch_size": cfg.batch_size, "max_attempts": cfg.max_shard_attempts}
    if cfg.in_process:
        from .local import LocalExecutor

        return LocalExecutor(cfg.engine.device, cfg.engine.threads, **run)
    from .ray import RayExecutor

    return RayExecutor(cfg.address, cfg.num_actors, cfg.gpus_per_actor, cfg.engine.threads, **run)
