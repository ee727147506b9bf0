"""`finetune(...)`: check everything on the driver, launch Ray Train's TorchTrainer, publish the final model.

OUTPUT holds, when a run completes:

    config.json, model.safetensors, tokenizer files   the finetuned model (`generate --model OUTPUT`)
    checkpoints/step-NNNNNNNN/                        the last `keep_checkpoints` saves (see `state.py`), and
    checkpoints/checkpoint_manager_snapshot.json        Ray Train's record of them (its run storage)
    metrics.csv, loss.png                             per-step loss, smoothed loss, learning rate, tokens/s
    samples.jsonl                                     samples written every `generate_every` steps
    events.jsonl                                      worker (re)starts with their step, and saves
    finetune.json                                     the options, what the run is made of, package versions

Rerunning with the same OUTPUT resumes at the last save (options that define the run must match; `max_steps`
and the saving, sampling and resource options may change).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from pathlib import Path

from ..config import check, flag, to_dict
from ..errors import UserError
from .config import FinetuneConfig
from .state import saved_steps

log = logging.getLogger("aitextgen_batch")
FORMAT = "aitextgen-batch/finetune"
RUN_NAME = "checkpoints"  # Ray Train's run folder inside OUTPUT: it holds the step folders
DEFAULT_BLOCK = 1024  # the default --block-size: the model's context, at most this
IDENTITY = (
    "source", "preset", "tokenizer_fingerprint", "dataset_sha256", "num_workers", "batch_size", "block_size",
    "gradient_accumulation", "seed", "learning_rate", "weight_decay", "adam_epsilon", "warmup_steps",
    "freeze_embeddings", "freeze_layers",
)  # fmt: skip


def _model(cfg: FinetuneConfig):
    """(source for the workers, tokenizer folder or None, tokenizer, model config) without loading the model.

    The folder's config, tokenizer and weights are checked here, on the driver, so that a bad model is refused before
    Ray Train starts: safetensors only (workers never open pickle), every file readable and every weight finite.
    """
    from ..models.fingerprint import weights_digest
    from ..models.loading import (
        check_folder_weights,
        check_tokenizer_fits,
        load_config,
        load_tokenizer,
        resolve_source,
    )
    from ..models.presets import preset_config

    if cfg.preset is not None:
        tok = load_tokenizer(cfg.tokenizer)
        return cfg.preset, str(cfg.tokenizer.resolve()), tok, preset_config(cfg.preset, tok)
    resolved = resolve_source(cfg.model or "")  # no --model: the bundled default model
    if resolved.kind == "preset":
        raise UserError(f"--model {cfg.model!r} names a preset: pass --preset {cfg.model} --tokenizer DIR instead")
    folder = Path(resolved.folder)
    config = load_config(folder)
    check_folder_weights(folder, allow_pickle=False, pickle_flag=False)
    if not list(folder.glob("*.safetensors")):  # a sharded checkpoint's index names files that are not there
        raise UserError(f"{str(folder)!r} has no *.safetensors weight files; save the model with save_pretrained")
    weights_digest(None, folder, finite=True)
    tok = load_tokenizer(cfg.tokenizer or folder)
    check_tokenizer_fits(folder, tok, cfg.tokenizer, getattr(config, "vocab_size", None) or len(tok))
    source = str(Path(folder).resolve()) if resolved.kind == "folder" else cfg.model
    return source, str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else None, tok, config


def plan(cfg: FinetuneConfig) -> dict:
    """Check the model, tokenizer, cache and output before any worker starts; return what the workers need.

    Raises:
        UserError: a missing cache, a cache built with another tokenizer, fewer shards than workers, a block size
            the model or a worker's shards cannot hold, or an OUTPUT holding a different run.
    """
    from ..data import TokenDataset
    from ..models.context import context_length

    source, tok_dir, tok, mconf = _model(cfg)
    # every shard's sha256 is checked here (streamed), so a damaged cache is named before Ray Train starts; the
    # tokenizer check names both fingerprints on a mismatch
    ds = TokenDataset(cfg.dataset, tokenizer=tok, verify=True)
    parts = ds.partition(cfg.num_workers)  # refuses fewer shards than workers
    context = context_length(mconf)
    block = cfg.block_size or min(context, DEFAULT_BLOCK)
    check(block <= context, "block_size", f"must be <= {context}, the model's context length", block)
    if cfg.generate_every:
        msg = f"must be < {context}, the model's context length"
        check(cfg.sample_tokens < context, "sample_tokens", msg, cfg.sample_tokens)
    if len(tok) > mconf.vocab_size:
        raise UserError(f"the tokenizer has {len(tok)} tokens but the model only {mconf.vocab_size} embeddings")
    for rank, shards in enumerate(parts):
        tokens = sum(ds.shard_tokens[i] for i in shards)
        if not ds.line_by_line and tokens < block:
            raise UserError(
                f"worker {rank}'s shards {shards} of {str(ds.path)!r} hold {tokens} tokens, fewer than block_size "
                f"(--block-size) {block}: use a smaller --block-size, fewer workers, or more text"
            )
    layers = mconf.num_hidden_layers
    check(cfg.freeze_layers <= layers, "freeze_layers", f"must be <= {layers}, the model's layers", cfg.freeze_layers)
    shard_sums = json.dumps([s["sha256"] for s in ds.index["shards"]])
    identity = {k: getattr(cfg, k, None) for k in IDENTITY}
    identity.update(
        source=source,
        block_size=block,
        tokenizer_fingerprint=ds.fingerprint,
        dataset_sha256=hashlib.sha256(shard_sums.encode()).hexdigest(),
    )
    c = to_dict(cfg)
    c.update(source=source, tokenizer=tok_dir, dataset=str(ds.path.resolve()), block_size=block)
    c["output"] = str(local_output(cfg.output))
    return {"worker": c, "identity": identity}


def _check_output(cfg: FinetuneConfig, p: dict) -> tuple[int, dict]:
    """Refuse an OUTPUT that holds something else or another run; returns (last saved step, the record to write)."""
    from ..models.provenance import package_versions

    out = Path(p["worker"]["output"])
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file, not a folder; pass a new folder for the finetuned model")
    doc_path = out / "finetune.json"
    try:
        old = json.loads(doc_path.read_text()) if doc_path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{doc_path} is not valid JSON ({exc}); remove it, or use a new --output") from exc
    if old is None and out.is_dir() and any(out.iterdir()):
        raise UserError(f"--output {out} exists and holds something other than a finetune run; use a new folder")
    saved = saved_steps(out / RUN_NAME)
    if old is not None and not saved:
        old = None  # a run that failed before its first save left nothing to resume: the corrected rerun starts anew
    if old is not None:
        diff = [
            f"{k}: {old['identity'].get(k)!r} -> {v!r}" for k, v in p["identity"].items() if old["identity"].get(k) != v
        ]
        if diff:
            raise UserError(
                f"--output {out} holds a finetune run made with other options ({'; '.join(diff)}); rerun with the "
                "same options to resume it, or choose a new --output"
            )
    last = saved[-1][0] if saved else 0
    if last > cfg.max_steps:
        raise UserError(f"--output {out} is already trained to step {last}; pass --max-steps >= {last} to go on")
    doc = {"format": FORMAT, "identity": p["identity"], "config": to_dict(cfg), "versions": package_versions()}
    doc["created"] = old["created"] if old else time.time()
    return last, doc


def _record(out: Path, doc: dict) -> None:
    from ..storage import write_file_atomic

    write_file_atomic(out / "finetune.json", json.dumps(doc, indent=1, default=str).encode())


def _resources(cfg: FinetuneConfig) -> int:
    """Threads per worker; refuses what the cluster cannot place (it would wait forever)."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 0)), int(res.get("GPU", 0))
    if cfg.use_gpu and gpus < cfg.num_workers:
        raise UserError(f"--use-gpu needs one GPU per worker ({cfg.num_workers}) but the Ray cluster has {gpus}")
    threads = cfg.threads or (2 if cfg.use_gpu else max(1, cpus // cfg.num_workers))
    if threads * cfg.num_workers > cpus:
        raise UserError(
            f"--num-workers {cfg.num_workers} x --threads {threads} needs {threads * cfg.num_workers} CPUs but the "
            f"Ray cluster has {cpus}; lower --threads or --num-workers"
        )
    return threads


def local_output(output) -> Path:
    """Where training writes: OUTPUT itself, or for an object-store URI a local staging folder (one per URI,
    kept so that a rerun on this machine resumes) whose model files are uploaded to the URI at the end."""
    from ..storage import cache_root, is_uri

    if not is_uri(output):
        return Path(output).resolve()
    return cache_root() / "finetune-staging" / hashlib.sha256(str(output).encode()).hexdigest()[:16]


def _publish_remote(local: Path, uri: str) -> None:
    """Upload the finished model folder and logs (not the checkpoints); config.json goes last."""
    from ..storage import Location

    loc = Location(uri)
    files = sorted(p for p in local.iterdir() if p.is_file())
    for p in sorted(files, key=lambda p: p.name == "config.json"):
        loc.write_bytes(p.read_bytes(), p.name)


def finetune(config: FinetuneConfig | None = None, **options) -> dict:
    """Finetune (or resume finetuning) a model on a token cache with Ray Train; returns a summary.

    An object-store OUTPUT trains in a local staging folder and is published there at the end (`local_output`).

    Example:
        finetune(model="my-model/", dataset="cache/", output="out/", num_workers=2, max_steps=1000)

    Raises:
        UserError: bad options, model, cache or output, found before any worker starts.
    """
    from ..config import build_config
    from ..storage import is_uri

    cfg = config or build_config(FinetuneConfig, options)
    summary = _finetune(cfg)
    if is_uri(cfg.output) and summary["status"] == "complete":
        _publish_remote(Path(summary["output"]), str(cfg.output))
        summary["output"] = str(cfg.output)
    return summary


def _finetune(cfg: FinetuneConfig) -> dict:
    """`finetune` into the local OUTPUT (or the staging folder of an object-store OUTPUT)."""
    from ..raycluster import connect_ray

    p = plan(cfg)
    t0 = time.time()
    last, record = _check_output(cfg, p)
    out = Path(p["worker"]["output"])
    if last == cfg.max_steps:  # nothing left to train: (re)publish the last save
        _record(out, record)
        return _finish(cfg, out, saved_steps(out / RUN_NAME)[-1][1], t0, "complete", None, cfg.num_workers)
    started = connect_ray(cfg.address)
    try:
        p["worker"]["threads"] = _resources(cfg)
        _record(out, record)
        return _launch(cfg, p, out, last, t0)
    finally:
        if started:
            import ray

            ray.shutdown()


def _launch(cfg: FinetuneConfig, p: dict, out: Path, last: int, t0: float) -> dict:
    import ray.train

    if not hasattr(ray.train, "CheckpointUploadMode"):  # saves are registered in place, a Ray Train V2 feature
        raise UserError("finetune needs Ray Train V2 (the default since Ray 2.50): unset RAY_TRAIN_V2_ENABLED=0")
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from .progress import FinetuneProgress
    from .worker import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=p["worker"],
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": p["worker"]["threads"]}
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=str(out),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    trainer._register_sigint_handler = _interrupt_on_sigint  # Ray Train's own handler exits 1 without a word
    error = None
    with FinetuneProgress(out, last, cfg.max_steps, quiet=cfg.quiet):
        try:
            result = trainer.fit()
        except TrainingFailedError as exc:  # after max_failures, with the workers' errors inside: reported as data
            log.debug("finetune failed", exc_info=exc)
            result, error = None, f"{type(exc).__name__}: {exc}"
    if result is not None and result.error is not None:
        error = str(result.error)
    checkpoint = Path(result.checkpoint.path) if result is not None and result.checkpoint is not None else None
    diverged = _diverged(cfg, out, t0)
    if diverged:  # the workers stopped at the step: nothing of it or after it was saved, and nothing is published
        error, checkpoint = diverged, None
    status = "complete" if error is None and checkpoint is not None else "failed"
    return _finish(cfg, out, checkpoint, t0, status, error, cfg.num_workers)


def _diverged(cfg: FinetuneConfig, out: Path, t0: float) -> str | None:
    """The error of a run whose loss or weights stopped being finite (a `diverged` event of this run), or None."""
    events = [e for e in _read_jsonl(out / "events.jsonl") if e.get("time", 0) >= t0]
    hit = next((e for e in events if e["event"] == "diverged"), None)
    if hit is None:
        return None
    step = hit["step"]
    good = [s for s, _ in saved_steps(out / RUN_NAME) if s < step]
    where = f"{flag('learning_rate')} {cfg.learning_rate:g} may be too high"
    if good:
        last = out / RUN_NAME / f"step-{good[-1]:08d}"
        fix = (
            f"The last good save is step {good[-1]} ({last}): to go on from it, finetune --model {last} into a new "
            "--output with a lower --learning-rate (rerunning this command would resume there and diverge again)"
        )
    else:
        fix = "No step was saved before it: rerun with a lower --learning-rate (the same --output starts again)"
    return (
        f"training diverged at step {step}: {hit['what']} ({where}). Training stopped; no weights of step {step} or "
        f"later were saved, and no model was published. {fix}"
    )


def _interrupt_on_sigint(controller) -> None:
    """Ctrl-C during `fit`: abort the run's controller (its workers stop; saved steps stay), then raise
    KeyboardInterrupt in the driver, so the CLI says how to resume and exits 130 as `generate` does. A second Ctrl-C
    interrupts at once."""
    import signal

    import ray

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            ray.get(controller.abort.remote(), timeout=30)
        except Exception:  # the controller is gone already, or did not answer in time: the driver stops anyway
            log.debug("aborting the Ray Train controller failed", exc_info=True)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


def _finish(cfg, out: Path, checkpoint: Path | None, t0: float, status: str, error, workers: int) -> dict:
    from .plot import plot_loss
    from .state import publish, read_state

    if status == "complete":
        publish(checkpoint, out)
    plot_loss(out / "metrics.csv", out / "loss.png")
    events = _read_jsonl(out / "events.jsonl")
    starts = [e["step"] for e in events if e["event"] == "start" and e["time"] >= t0]
    rows = _read_csv(out / "metrics.csv")
    first = starts[0] if starts else cfg.max_steps
    run_rows = [r for r in rows if int(r["step"]) > first]
    before = next((int(r["tokens"]) for r in rows if int(r["step"]) == first), 0)
    tokens = int(run_rows[-1]["tokens"]) - before if run_rows else 0
    # `seconds` restarts at 0 with each worker (re)start: add up each session's last value
    train_seconds = sum(
        float(r["seconds"])
        for i, r in enumerate(run_rows)
        if i + 1 == len(run_rows) or float(run_rows[i + 1]["seconds"]) < float(r["seconds"])
    )
    state = read_state(checkpoint) if checkpoint is not None else {}
    summary = {
        "status": status,
        "output": str(out),
        "step": state.get("step", 0),
        "max_steps": cfg.max_steps,
        "loss": round(state["smoothed_loss"], 4) if state.get("smoothed_loss") is not None else None,
        "resumed_from": starts,
        "worker_restarts": max(0, len(starts) - 1),
        "workers": workers,
        "tokens": tokens,
        "tokens_per_second": round(tokens / train_seconds, 1) if train_seconds else None,
        "seconds": round(time.time() - t0, 1),
        "checkpoint": str(checkpoint) if checkpoint else None,
    }
    if error:
        summary["error"] = error
    return summary


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_finetune(cfg: FinetuneConfig) -> int:
    """CLI handler: run `finetune`, print the summary table; exit code 0 when complete, else 1."""
    from ..console import print_table

    summary = finetune(cfg)
    error = summary.pop("error", None)
    print_table(summary, title="finetune summary")
    if error:
        print(f"error: {error}")
    return 0 if summary["status"] == "complete" else 1
