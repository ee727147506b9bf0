"""The Ray Train worker loop: resume from the last save, build the Lightning Trainer (RayDDPStrategy), train.

Where a worker starts: the checkpoint Ray Train hands back (`ray.train.get_checkpoint()`: after a worker failure
within a run, or from the run snapshot in OUTPUT/checkpoints when a finished or killed run is started again), else
the newest complete step folder in OUTPUT/checkpoints, else the model or preset (step 0).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

PRECISION = {"32": "32-true", "bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed"}


def _quiet() -> None:
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for module in ("pytorch_lightning", "lightning_fabric", "lightning"):  # either flavor (see flavor.py)
        warnings.filterwarnings("ignore", module=module)
    from ..models.loading import quiet_transformers

    quiet_transformers()


def _resume_dir(output: Path):
    """A context manager giving the step folder to resume from, or None."""
    import ray.train

    from .state import saved_steps, step_problem

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None and step_problem(Path(ckpt.path)) is None:  # a damaged save is never resumed from
        return ckpt.as_directory()
    saved = saved_steps(output / "checkpoints")
    return nullcontext(str(saved[-1][1]) if saved else None)


def _report(step: int, folder: Path | None, metrics: dict) -> None:
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    # The step folder already lies in the run's storage (OUTPUT/checkpoints): register it where it is, no copy.
    ray.train.report(
        metrics,
        checkpoint=Checkpoint.from_directory(str(folder)) if folder is not None else None,
        checkpoint_dir_name=f"step-{step:08d}",
        checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
    )


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; `config` is the resolved plan from `api.py` (plain JSON data)."""
    import ray.train
    import torch
    from ray.train.lightning import RayDDPStrategy, RayLightningEnvironment, prepare_trainer

    from ..models.loading import load_model
    from .callbacks import Checkpointer, Divergence, MetricsLog, SampleWriter, append_jsonl, truncate_logs
    from .datamodule import TokenDataModule
    from .flavor import pl
    from .module import CausalLMModule, freeze
    from .state import read_state

    _quiet()
    c = config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(c["threads"])
    output = Path(c["output"])
    with _resume_dir(output) as resume_dir:
        state = read_state(resume_dir) if resume_dir else None
        source = str(resume_dir) if resume_dir else c["source"]
        tokenizer = None if resume_dir else c["tokenizer"]
        model, tok = load_model(source, device="cpu", dtype=torch.float32, tokenizer=tokenizer, seed=c["seed"])
    start = state["step"] if state else 0
    if rank == 0:
        truncate_logs(output, start)
        for tmp in (output / "checkpoints").glob(".tmp-step-*"):  # left by a rank 0 killed while saving
            shutil.rmtree(tmp, ignore_errors=True)
        event = {"event": "start", "step": start, "workers": world, "pid": os.getpid(), "time": time.time()}
        append_jsonl(output / "events.jsonl", event)
    if start >= c["max_steps"]:
        return
    if c["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    freeze(model, c["freeze_embeddings"], c["freeze_layers"])
    k = c["gradient_accumulation"]
    module = CausalLMModule(
        model,
        learning_rate=c["learning_rate"],
        weight_decay=c["weight_decay"],
        adam_epsilon=c["adam_epsilon"],
        warmup_steps=c["warmup_steps"],
        max_steps=c["max_steps"],
        gradient_accumulation=k,
        seed=c["seed"],
        rank=rank,
        start_step=start,
        resume=state,
    )
    data = TokenDataModule(c["dataset"], c["block_size"], c["batch_size"], c["seed"], start_batch=start * k)
    state = state or {}
    guard = Divergence(output / "events.jsonl", rank == 0)
    metrics = MetricsLog(
        output / "metrics.csv",
        rank == 0,
        state.get("smoothed_loss"),
        state.get("loss_count", 0),
        state.get("tokens", 0),
        guard,
    )
    callbacks = [
        metrics,
        Checkpointer(
            output / "checkpoints",
            c["save_every"],
            c["max_steps"],
            tok,
            rank == 0,
            _report,
            metrics.state,
            output / "events.jsonl",
            guard,
        ),
    ]
    if rank == 0 and c["generate_every"]:
        callbacks.append(
            SampleWriter(
                output / "samples.jsonl",
                c["generate_every"],
                tok,
                c["sample_prompt"],
                c["num_samples"],
                c["sample_tokens"],
                c["seed"],
                guard,
            )
        )
    trainer = pl.Trainer(
        max_steps=c["max_steps"] - start,
        accelerator="gpu" if c["use_gpu"] else "cpu",
        devices="auto",
        strategy=RayDDPStrategy(),
        plugins=[RayLightningEnvironment()],
        precision=PRECISION[c["precision"]],
        accumulate_grad_batches=k,
        gradient_clip_val=c["max_grad_norm"] or None,
        gradient_clip_algorithm="norm",
        callbacks=callbacks,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer = prepare_trainer(trainer)
    trainer.fit(module, datamodule=data)
