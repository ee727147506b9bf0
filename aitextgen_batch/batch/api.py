"""`generate_dataset`: Parquet prompts in, Parquet results out, on Ray; resumable and exactly once."""

from __future__ import annotations

import base64
import dataclasses
import logging
import time
from dataclasses import dataclass, field

from ..config import check, check_range, to_dict
from ..errors import UserError
from ..generation.engine import DEFAULT_SLOTS
from ..generation.options import EngineConfig
from ..generation.params import SamplingParams
from ..storage import Location
from . import manifest as mf

log = logging.getLogger("aitextgen_batch")


@dataclass
class GenerateConfig:
    """Generate text for every row of Parquet prompts on Ray actors: sharded, resumable, exactly once."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    input: str = field(default="", metadata={"help": "a Parquet file, a folder of them, or a glob"})
    output: str = field(default="", metadata={"help": "output folder (Parquet shards + _job.json)"})
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompts"})
    id_column: str = field(default="id", metadata={"help": "unique id column; if absent, ids are file:row"})
    seed_column: str | None = field(default=None, metadata={"help": "per-row seeds; else derived from --seed + id"})
    keep_columns: list[str] = field(default_factory=list, metadata={"help": "input columns copied to the output"})
    seed: int = field(default=0, metadata={"help": "job seed from which per-item seeds derive, >= 0"})
    shard_rows: int = field(default=1000, metadata={"help": "input rows per shard, >= 1"})
    batch_size: int = field(default=256, metadata={"help": "items scheduled together in an actor, >= 1"})
    num_actors: int | None = field(default=None, metadata={"help": "default: one per GPU, else one per CPU"})
    gpus_per_actor: float | None = field(default=None, metadata={"help": "default 1 when the cluster has GPUs"})
    address: str | None = field(default=None, metadata={"help": "Ray cluster address; default: start a local Ray"})
    max_shard_attempts: int = field(default=3, metadata={"help": "tries per shard before it is marked failed"})
    overwrite: bool = field(default=False, metadata={"help": "delete an existing job in --output and start over"})
    quiet: bool = field(default=False, metadata={"help": "log lines instead of a live progress bar"})

    def __post_init__(self):
        check(bool(self.input), "input", "is required: a Parquet file, folder or glob")
        check(bool(self.output), "output", "is required: the folder to write results to")
        check_range("seed", self.seed, 0)
        check_range("shard_rows", self.shard_rows, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("max_shard_attempts", self.max_shard_attempts, 1)
        if self.num_actors is not None:
            check_range("num_actors", self.num_actors, 1)
        if self.gpus_per_actor is not None:
            check_range("gpus_per_actor", self.gpus_per_actor, 0)
        if isinstance(self.keep_columns, str):
            self.keep_columns = [self.keep_columns]
        from .shard import BASE_FIELDS

        reserved = {"id"} | {name for name, _ in BASE_FIELDS}
        clash = sorted(set(self.keep_columns) & reserved)
        check(not clash, "keep_columns", f"cannot keep {clash}: those names are output columns", self.keep_columns)


def ensure_ray(address: str | None) -> bool:
    """Connect to `address`, or to the cluster of a `ray job submit` (RAY_ADDRESS), or start a local Ray.

    Returns True when this call started Ray (and so should shut it down).
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(**kwargs)
    return True


def _resources(cfg: GenerateConfig) -> tuple[int, float, float, int, str]:
    """(num_actors, cpus_per_actor, gpus_per_actor, threads, device) from the cluster and the flags."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
    gpa = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if gpa > 0:
        if gpus == 0:
            raise UserError("--gpus-per-actor asks for GPUs but the Ray cluster has none; pass --gpus-per-actor 0")
        n = cfg.num_actors or max(1, int(gpus / gpa))
        cpa = max(1.0, min(4.0, cpus / n))
        threads = int(cfg.engine.threads or cpa)
        return n, cpa, gpa, threads, "cuda"
    # One single-threaded actor per CPU: measured faster than fewer actors with more threads each
    # (jobs/benchmark_ray.py: 2 actors x 1 thread beat 1 actor x 2 threads by 1.4x on 2 CPUs).
    n = cfg.num_actors or max(1, cpus)
    threads = int(cfg.engine.threads or max(1, cpus // n))
    return n, float(min(threads, max(1, cpus // n))), 0.0, threads, "cpu"


def _numerics(cfg: GenerateConfig, device: str) -> dict:
    """What fixes the engine's arithmetic: device kind, dtype and slots (all recorded in the manifest)."""
    e = cfg.engine
    return {
        "device": device,
        "dtype": e.dtype or ("float32" if device == "cpu" else "bfloat16"),
        "slots": e.slots or DEFAULT_SLOTS[device],
    }


def _model_spec(cfg: GenerateConfig) -> dict:
    """How to load the model (stored in the manifest; an empty source is the bundled default model)."""
    e = cfg.engine
    return {
        "source": e.model,
        "tokenizer": str(e.tokenizer) if e.tokenizer else None,
        "trust_remote_code": e.trust_remote_code,
        "allow_pickle": e.allow_pickle,
    }


def _build_job(cfg: GenerateConfig, device: str) -> dict:
    import pyarrow as pa

    from ..models.provenance import fingerprint_source, package_versions
    from .inputs import validate_inputs
    from .plan import plan_shards

    id_col = cfg.id_column
    files, types, has_id, id_type = validate_inputs(
        cfg.input, cfg.prompt_column, id_col, cfg.seed_column, cfg.keep_columns
    )
    e = cfg.engine
    fingerprint = fingerprint_source(e.model, e.tokenizer, e.trust_remote_code)
    numerics = _numerics(cfg, device)
    identity = {
        "model_fingerprint": fingerprint,
        "sampling": to_dict(cfg.sampling),
        "job_seed": cfg.seed,
        "columns": {
            "prompt": cfg.prompt_column,
            "id": id_col if has_id else None,
            "seed": cfg.seed_column,
            "keep": list(cfg.keep_columns),
        },
        "inputs": [[f.name, f.rows] for f in files],
        "shard_rows": cfg.shard_rows,
        "engine": numerics,
    }
    keep = pa.schema([pa.field(c, types[c]) for c in cfg.keep_columns])
    return {
        "format": mf.FORMAT,
        "identity": identity,
        "output": Location(cfg.output).uri,
        "model": _model_spec(cfg),
        "files": [dataclasses.asdict(f) for f in files],
        "has_id": has_id,
        "id_type": id_type,
        "keep_schema": base64.b64encode(keep.serialize().to_pybytes()).decode(),
        "shards": plan_shards(files, cfg.shard_rows),
        "versions": package_versions(),
    }


def engine_options(model: dict, numerics: dict, threads: int | None = None) -> dict:
    """EngineConfig fields that rebuild a job's engine exactly: same model, device kind, dtype and slots."""
    return {
        "model": model["source"],
        "tokenizer": model["tokenizer"],
        "device": numerics["device"],
        "dtype": numerics["dtype"],
        "slots": numerics["slots"],
        "threads": threads,
        "trust_remote_code": model["trust_remote_code"],
        "allow_pickle": model["allow_pickle"],
    }


def generate_dataset(config: GenerateConfig | None = None, **options) -> dict:
    """Run (or resume) a generation job; returns its summary. Options are the CLI flags as keywords.

    Example:
        generate_dataset(input="prompts.parquet", output="out/", model="my-model/", max_new_tokens=64)

    Raises:
        UserError: bad input, model or flags (nothing is written), or a job in `output` made differently.
    """
    from ..config import build_config

    cfg = config or build_config(GenerateConfig, options)
    started = ensure_ray(cfg.address)
    try:
        return _run(cfg)
    finally:
        if started:
            import ray

            ray.shutdown()


def _run(cfg: GenerateConfig) -> dict:
    from .progress import JobProgress
    from .runner import run_shards, start_actors, stop_actors

    t0 = time.time()
    n_actors, cpa, gpa, threads, device = _resources(cfg)
    actors: list = []
    try:
        # Actors start first and load the model while the driver checks the inputs; on any input error
        # they are stopped before anything is written.
        options = engine_options(_model_spec(cfg), _numerics(cfg, device), threads)
        actors = start_actors(options, n_actors, cpa, gpa, threads)
        job = _build_job(cfg, device)
        out = Location(job["output"])
        pending, skipped, records = _prepare_output(cfg, job, out, t0)
        actors = _trim(actors, len(pending))
        failed: dict[int, str] = {}
        total_rows = sum(s["rows"] for s in job["shards"])
        progress = JobProgress(
            len(job["shards"]), total_rows, quiet=cfg.quiet, already=[r for r in records.values() if r]
        )
        stats = {"actor_restarts": 0, "retries": 0}
        with progress:
            if pending:

                def done(rec):
                    records[rec["shard"]] = rec
                    progress.shard_done(rec)

                def fail(s, err):
                    failed[s] = err
                    progress.shard_failed(s, err)

                stats = run_shards(
                    actors,
                    job,
                    pending,
                    batch_size=cfg.batch_size,
                    max_attempts=cfg.max_shard_attempts,
                    on_done=done,
                    on_fail=fail,
                    on_tick=progress.tick,
                )
    finally:
        stop_actors(actors)
    return _finish(job, out, records, failed, skipped, stats, t0, len(actors) or n_actors, progress)


def _trim(actors: list, needed: int) -> list:
    """Stop the actors beyond the number of shards left to do."""
    from .runner import stop_actors

    stop_actors(actors[needed:])
    return actors[:needed]


def _prepare_output(cfg: GenerateConfig, job: dict, out: Location, t0: float):
    """Check or create OUT, clean leftovers, write the manifest; returns (pending, skipped, records)."""
    old = mf.read_job(out)
    if old is not None and cfg.overwrite:
        mf.wipe(out)
        old = None
    if old is not None:
        mf.check_compatible(old, job["identity"], out)
        job["created"] = old.get("created", t0)
    elif out.list(pattern="*.parquet"):
        raise UserError(f"--output {out} already holds Parquet files from something else; use an empty folder")
    out.mkdir()
    cleaned = mf.clean_tmp(out)
    if cleaned:
        log.warning("removed %d leftover temporary files from an interrupted run", cleaned)
    job.setdefault("created", t0)
    job["status"] = "running"
    mf.write_job(out, job)
    names = set(out.list(recursive=True))
    records = {s["shard"]: mf.done_record(out, s["shard"], names) for s in job["shards"]}
    pending = [s for s, r in records.items() if r is None]
    return pending, len(job["shards"]) - len(pending), records


def _finish(job, out, records, failed, skipped, stats, t0, n_actors, progress) -> dict:
    for s in job["shards"]:
        rec = records.get(s["shard"])
        s["state"] = "done" if rec else "failed" if s["shard"] in failed else "pending"
        if rec:
            s.update({k: rec[k] for k in ("rows_out", "tokens", "errors", "seconds")})
        if s["shard"] in failed:
            s["error"] = failed[s["shard"]]
    done = [r for r in records.values() if r]
    summary = {
        "output": out.uri,
        "shards": len(job["shards"]),
        "shards_done": len(done),
        "shards_skipped": skipped,
        "shards_failed": len(failed),
        "rows": sum(r["rows_out"] for r in done),
        "error_rows": sum(r["errors"] for r in done),
        "tokens": sum(r["tokens"] for r in done),
        "seconds": round(time.time() - t0, 2),
        "actors": n_actors,
        **stats,
    }
    summary["tokens_per_second"] = round(progress.session_tokens / max(progress.elapsed, 1e-9), 1)
    job["status"] = "complete" if len(done) == len(job["shards"]) else "failed" if failed else "incomplete"
    job["summary"] = summary
    job["failed"] = {str(k): v for k, v in failed.items()}
    mf.write_job(out, job)
    summary["status"] = job["status"]
    summary["failed"] = job["failed"]
    progress.summary(summary)
    return summary
