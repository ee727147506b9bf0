"""`generate_dataset`: Parquet or JSONL prompts (or chat messages) in, Parquet results out, on Ray; resumable and
exactly once."""

from __future__ import annotations

import dataclasses
import functools
import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal

from ..config import check, check_at_most, check_range, check_seed
from ..errors import UserError
from ..generation.options import EngineConfig
from ..generation.params import SamplingParams
from ..storage import Location
from . import manifest as mf
from .manifest import ChatSpec, Columns, DoneRecord, Identity, JobSpec, ModelSpec, Numerics, RequestSpec, Session

log = logging.getLogger("aitextgen_batch")

# Upper bounds of the job's sizes, far beyond any use: each is refused up front with its flag named.
MAX_SHARD_ROWS = 1_000_000
MAX_SHARD_SAMPLES = 10_000_000
MAX_BATCH_SIZE = 1 << 20
MAX_ATTEMPTS = 100
MAX_ACTORS = 10_000
MAX_GPUS_PER_ACTOR = 64


@dataclass
class GenerateConfig:
    """Generate text for every row of Parquet or JSONL prompts on Ray actors: sharded, resumable, exactly once."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    input: str = field(default="", metadata={"help": "a Parquet or JSONL file, a folder of them, or a glob"})
    output: str = field(default="", metadata={"help": "output folder (Parquet shards + _job.json)"})
    input_format: Literal["rows", "openai-batch"] = field(
        default="rows",
        metadata={
            "help": "rows: prompts (or messages) in columns, as the flags below say; openai-batch: one OpenAI batch "
            "request file (custom_id, method, url, body per line), each request a row (as run-batch reads it)"
        },
    )
    served_model_name: list[str] = field(
        default_factory=list,
        metadata={
            "help": "openai-batch: the model names a request's model may give (default: --model as given and its "
            "folder's name); the first is the one responses report"
        },
    )
    ignore_model_name: bool = field(
        default=False, metadata={"help": "openai-batch: answer every request with this model, whatever its model says"}
    )
    prompt_column: str = field(default="prompt", metadata={"help": "column holding the prompts"})
    id_column: str = field(default="id", metadata={"help": "unique id column; if absent, ids are file:row"})
    seed_column: str | None = field(default=None, metadata={"help": "per-row seeds; else derived from --seed + id"})
    keep_columns: list[str] = field(default_factory=list, metadata={"help": "input columns copied to the output"})
    messages_column: str | None = field(
        default=None,
        metadata={
            "help": "column of chat messages, list<struct<role, content>> or JSON text of one, rendered with the "
            "chat template (add_generation_prompt); the output's prompt is the rendered text"
        },
    )
    chat: bool = field(
        default=False, metadata={"help": "render each --prompt-column text as one user message with the chat template"}
    )
    system_prompt: str | None = field(
        default=None, metadata={"help": "chat: a system message put first in every conversation that has none"}
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "chat: a Jinja chat template file (default: the tokenizer's)"}
    )
    params_column: str | None = field(
        default=None,
        metadata={
            "help": "per-row sampling params: a struct column, or JSON text of an object, of sampling fields "
            "(temperature, max_new_tokens, ...) over the job's; each row's are written to the output's params column"
        },
    )
    logprobs: bool = field(
        default=False,
        metadata={
            "help": "add cumulative_logprob: the sum over the generated tokens (eos included) of the model's "
            "log-softmax, taken before temperature, top-k, top-p and penalties"
        },
    )
    return_tokens: bool = field(
        default=False,
        metadata={
            "help": "add token_ids (the generated tokens, with the final eos when the row ended with one) and "
            "token_logprobs (each one's log-softmax under the model, before temperature, top-k and top-p)"
        },
    )
    seed: int = field(default=0, metadata={"help": "job seed from which per-item seeds derive, >= 0"})
    shard_rows: int = field(default=1000, metadata={"help": "input rows per shard, >= 1"})
    batch_size: int = field(default=256, metadata={"help": "prompts an actor tokenizes together, >= 1 (speed only)"})
    num_actors: int | None = field(default=None, metadata={"help": "default: one per GPU, else one per CPU"})
    gpus_per_actor: float | None = field(default=None, metadata={"help": "default 1 when the cluster has GPUs"})
    address: str | None = field(
        default=None, metadata={"help": "Ray cluster address; default: $RAY_ADDRESS, else start a local Ray"}
    )
    max_shard_attempts: int = field(default=3, metadata={"help": "tries per shard before it is marked failed"})
    in_process: bool = field(
        default=False,
        metadata={"help": "run the shards one by one in this process, without Ray (small jobs, notebooks, debugging)"},
    )
    overwrite: bool = field(default=False, metadata={"help": "delete an existing job in --output and start over"})
    quiet: bool = field(default=False, metadata={"help": "log lines instead of a live progress bar"})
    price_per_hour: float | None = field(
        default=None,
        metadata={
            "help": "USD per device-hour (a GPU, or a CPU core for a CPU job): the summary then says what the job cost "
            "and the cost per million generated tokens"
        },
    )

    def __post_init__(self):
        check(bool(self.input), "input", "is required: a Parquet file, folder or glob")
        if self.price_per_hour is not None:
            check_range("price_per_hour", self.price_per_hour, 0.0)
        if isinstance(self.served_model_name, str):
            self.served_model_name = [self.served_model_name]
        self._check_input_format()
        check(bool(self.output), "output", "is required: the folder to write results to")
        check_seed("seed", self.seed)
        check_range("shard_rows", self.shard_rows, 1)
        check_at_most("shard_rows", self.shard_rows, MAX_SHARD_ROWS, " (a shard's rows are held by its actor)")
        samples = self.shard_rows * self.sampling.num_return_sequences
        check(
            samples <= MAX_SHARD_SAMPLES,
            "shard_rows",
            f"x --num-return-sequences is {samples:,} samples per shard, held together by its actor; at most "
            f"{MAX_SHARD_SAMPLES:,}: lower --shard-rows",
        )
        check_range("batch_size", self.batch_size, 1)
        check_at_most("batch_size", self.batch_size, MAX_BATCH_SIZE)
        check_range("max_shard_attempts", self.max_shard_attempts, 1)
        check_at_most("max_shard_attempts", self.max_shard_attempts, MAX_ATTEMPTS)
        if self.num_actors is not None:
            check_range("num_actors", self.num_actors, 1)
            check_at_most("num_actors", self.num_actors, MAX_ACTORS)
        if self.gpus_per_actor is not None:
            check_range("gpus_per_actor", self.gpus_per_actor, 0)
            check_at_most("gpus_per_actor", self.gpus_per_actor, MAX_GPUS_PER_ACTOR)
        if isinstance(self.keep_columns, str):
            self.keep_columns = [self.keep_columns]
        check(
            not (self.chat and self.messages_column),
            "chat",
            "and --messages-column both say where chat messages come from; pass one",
        )
        chat_input = self.chat or self.messages_column is not None or self.input_format == "openai-batch"
        for name in ("system_prompt", "chat_template"):
            check(chat_input or getattr(self, name) is None, name, "is for chat input: add --chat or --messages-column")
        from .schema import BASE_FIELDS, optional_fields

        reserved = {"id"} | {name for name, _ in BASE_FIELDS}
        reserved |= set(
            optional_fields(self.params_column is not None, self.logprobs, self.return_tokens, *self.logprob_columns)
        )
        clash = sorted(set(self.keep_columns) & reserved)
        check(not clash, "keep_columns", f"cannot keep {clash}: those names are output columns", self.keep_columns)

    def _check_input_format(self) -> None:
        """An OpenAI batch file says where everything is: the flags that name columns do not apply to it."""
        if self.input_format != "openai-batch":
            for name in ("served_model_name", "ignore_model_name"):
                check(not getattr(self, name), name, "is for --input-format openai-batch (or run-batch)")
            return
        defaults = {
            f.name: f.default for f in dataclasses.fields(GenerateConfig) if f.default is not dataclasses.MISSING
        }
        for name in ("prompt_column", "id_column", "seed_column", "messages_column", "params_column", "chat"):
            check(
                getattr(self, name) == defaults[name],
                name,
                "does not apply to --input-format openai-batch: each request line has its custom_id, and its body its "
                "messages or prompt, seed and sampling fields",
            )
        check(not self.keep_columns, "keep_columns", "does not apply to --input-format openai-batch")
        self.return_tokens = True  # the results' log-probabilities are made from token_ids and token_logprobs

    @property
    def logprob_columns(self) -> tuple[bool, bool]:
        """Whether the output has top_logprobs and prompt_logprobs: when the flags ask, or when rows have their own
        params (any row may ask)."""
        per_row = self.params_column is not None or self.input_format == "openai-batch"
        return self.sampling.top_logprobs > 0 or per_row, self.sampling.prompt_logprobs or per_row

    @property
    def columns(self) -> Columns:
        if self.input_format == "openai-batch":
            from .openai_batch.requests import COLUMNS

            return dataclasses.replace(COLUMNS, keep=list(COLUMNS.keep))
        return Columns(
            prompt=self.prompt_column,
            id=self.id_column,
            seed=self.seed_column,
            keep=list(self.keep_columns),
            messages=self.messages_column,
            params=self.params_column,
        )


@dataclass
class Resources:
    """How the job's actors are placed (`_resources`)."""

    num_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int
    device: str  # "cuda" or "cpu"
    device_type: str = "cpu"  # for the job's cost: "cpu", or "cuda" with the accelerator type ("cuda:H100")

    @property
    def devices(self) -> float:
        """What the actors hold, in the units of `--price-per-hour`: GPUs, or CPU cores for a CPU job."""
        per = self.gpus_per_actor if self.device == "cuda" else self.cpus_per_actor
        return self.num_actors * (per or (1.0 if self.device == "cuda" else self.threads))


@dataclass
class JobSummary:
    """What `generate_dataset` returns (and `_job.json` stores as `summary`). Reads as a mapping too: `s["rows"]`."""

    status: str  # complete | failed | incomplete
    output: str
    shards: int
    shards_done: int
    shards_skipped: int
    shards_failed: int
    rows: int
    error_rows: int
    tokens: int  # generated tokens (each row's, the final eos included)
    prompt_tokens: int  # prompt tokens of the generated rows (each sample's prompt counts)
    tokens_per_second: float
    seconds: float  # this run's wall time
    actors: int
    actor_restarts: int
    retries: int
    # what the job cost, over every run of it (`cost.summary_fields`)
    wall_seconds: float
    sessions: int
    device_seconds: dict[str, float]  # device type -> devices x seconds held
    tokens_per_device_hour: float
    price_per_hour: float | None
    cost_usd: float | None
    usd_per_million_tokens: float | None  # per million generated tokens
    failed: dict[str, str] = field(default_factory=dict)  # shard -> error ("all" when every row is an error row)

    def __getitem__(self, key: str):
        return getattr(self, key)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class CheckedJob:
    """What the driver knows once the inputs and the model are checked, before Ray starts."""

    inputs: object  # inputs.InputCheck
    fingerprint: str
    config: object = None  # the model's config
    parameters: int = 0
    chat: ChatSpec | None = None
    chat_template: str | None = None  # the template's text
    requests: RequestSpec | None = None  # how an OpenAI batch file was read
    staging: tempfile.TemporaryDirectory | None = None  # local Parquet copies of JSONL inputs

    def cleanup(self) -> None:
        if self.staging is not None:
            self.staging.cleanup()


def _local_resources(cfg: GenerateConfig) -> Resources:
    """`--in-process`: this process is the one worker, on its own CUDA device when it has one."""
    from ..models.loading import default_device
    from .cost import device_type

    device = (cfg.engine.device or default_device()).split(":")[0]
    return Resources(1, 0.0, 0.0, int(cfg.engine.threads or 1), device, device_type(device))


def _resources(cfg: GenerateConfig) -> Resources:
    """How many actors, with what, from the cluster's resources and the flags.

    Raises:
        UserError: more actors than the cluster can place (they would never start), or GPUs the cluster lacks.
    """
    import ray

    from .cost import device_type

    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
    gpa = cfg.gpus_per_actor if cfg.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if gpa > 0:
        if gpus == 0:
            raise UserError("--gpus-per-actor asks for GPUs but the Ray cluster has none; pass --gpus-per-actor 0")
        fits = int(gpus / gpa)
        n = cfg.num_actors or max(1, fits)
        if n > fits:
            raise UserError(
                f"--num-actors {n} x --gpus-per-actor {gpa:g} needs {n * gpa:g} GPUs but the Ray cluster has {gpus}; "
                f"pass --num-actors {max(1, fits)} or fewer"
            )
        cpa = max(1.0, min(4.0, cpus / n))
        threads = int(cfg.engine.threads or cpa)
        return Resources(n, cpa, gpa, threads, "cuda", device_type("cuda", res))
    # One single-threaded actor per CPU: measured faster than fewer actors with more threads each
    # (jobs/benchmark_ray.py: 2 actors x 1 thread beat 1 actor x 2 threads by 1.4x on 2 CPUs). Threads stay 1 unless
    # --threads says otherwise, whatever --num-actors is: a CPU matmul may split its sums across threads, so the thread
    # count can change a row's last bits, and the actor count must not.
    n = cfg.num_actors or max(1, cpus)
    if n > cpus:
        raise UserError(
            f"--num-actors {n} needs at least {n} CPUs (one each) but the Ray cluster has {cpus}: the rest would "
            f"never start. Pass --num-actors {cpus} or fewer, or use a larger cluster (--address)"
        )
    threads = int(cfg.engine.threads or 1)
    return Resources(n, float(min(threads, max(1, cpus // n))), 0.0, threads, "cpu")


def check_kv_memory(cfg: GenerateConfig, checked: CheckedJob, engine: EngineConfig, actors: int) -> None:
    """Refuse, in seconds and with the sizes, a job whose KV cache cannot fit on this machine even for its shortest
    rows (CPU jobs on this machine: in-process, or a Ray this driver starts). Longer rows that do not fit become error
    rows in the engine (`Engine._fit`).

    Args:
        engine: the job's resolved engine config (`EngineConfig.resolved`).

    Raises:
        UserError: `actors` caches of `slots` rows over the shortest row's length exceed the free memory.
    """
    from ..generation import memory
    from ..generation.engine import bucket_length, cache_length
    from ..models.loading import resolve_dtype
    from ..raycluster import ray_address

    local = cfg.in_process or ray_address(cfg.address) == "local"
    per = memory.estimate_bytes_per_position(checked.config, resolve_dtype(engine.dtype).itemsize)
    if engine.device != "cpu" or not local or not per:
        return
    length = cache_length(bucket_length(1, 8), cfg.sampling.max_new_tokens)
    weights = checked.parameters * resolve_dtype(engine.dtype).itemsize
    budget = (memory.available_bytes("cpu") - actors * weights) // actors
    need = memory.cache_bytes(engine.slots, length, per)
    if need <= memory.USABLE * budget:
        return
    fits = memory.fitting_slots(length, per, budget)
    sizes = memory.describe(engine.slots, length, per)
    free = memory.gb(max(budget, 0))
    raise UserError(
        f"--max-new-tokens {cfg.sampling.max_new_tokens} needs a KV cache of {sizes} per actor, but {free} is free "
        f"per actor ({actors} actor(s), each also holding {memory.gb(weights)} of weights): "
        + (f"pass --slots {fits} or fewer, " if fits >= 2 else "")
        + "lower --max-new-tokens, or run fewer actors (--num-actors)"
    )


def _model_spec(cfg: GenerateConfig) -> ModelSpec:
    """How to load the model (stored in the manifest; an empty source is the bundled default model)."""
    e = cfg.engine
    return ModelSpec(
        source=e.model,
        tokenizer=str(e.tokenizer) if e.tokenizer else None,
        trust_remote_code=e.trust_remote_code,
        allow_pickle=e.allow_pickle,
    )


def check_job(cfg: GenerateConfig) -> CheckedJob:
    """Every check that needs no cluster, run before Ray starts: inputs, output placement, model, chat template and
    lengths. JSONL inputs are checked line by line and copied to Parquet in a local temporary folder (`cleanup()`
    removes it).

    Raises:
        UserError: a bad input file (or JSONL line), an --output inside --input, a model that cannot load (pickle
            weights without --allow-pickle are refused before any file is opened), a chat job without a usable chat
            template, or --max-new-tokens beyond the model's context.
    """
    from pathlib import Path

    from ..generation.chat import ChatRenderer
    from ..generation.prompts import room_error
    from ..models.provenance import inspect_source
    from .inputs import check_output_apart, validate_inputs

    out = Location(cfg.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {cfg.output!r} is a file; pass a folder (new, or one a generate run wrote)")
    checked = CheckedJob(None, "", staging=tempfile.TemporaryDirectory(prefix="aitextgen-batch-inputs-"))
    try:
        stage = None
        if cfg.input_format == "openai-batch":
            from .openai_batch.requests import served_model_names, stage_requests

            names = served_model_names(cfg.engine.model, cfg.served_model_name)
            checked.requests = RequestSpec(names, cfg.ignore_model_name)
            stage = functools.partial(stage_requests, spec=checked.requests, base=cfg.sampling)
        checked.inputs = validate_inputs(cfg.input, cfg.columns, Path(checked.staging.name), stage)
        check_output_apart(cfg.output, cfg.input, checked.inputs)
        e = cfg.engine
        facts = inspect_source(e.model, e.tokenizer, e.trust_remote_code, e.allow_pickle)
        checked.fingerprint = facts.fingerprint
        checked.config, checked.parameters = facts.config, facts.parameters
        chat_requests = _chat_requests(checked) if checked.requests else 0
        if cfg.chat or cfg.messages_column or chat_requests:
            try:
                renderer = ChatRenderer(facts.tokenizer, cfg.chat_template, cfg.system_prompt)
            except UserError as exc:
                if not chat_requests:
                    raise
                raise UserError(f"{cfg.input}: {chat_requests} request(s) are chat completions, but {exc}") from None
            refused = renderer.refuses_every_row(every_row_is_one_user_message=cfg.chat)
            if refused:
                raise UserError(refused)
            mode = "messages" if cfg.messages_column else "requests" if chat_requests else "prompt"
            checked.chat = ChatSpec(mode, renderer.template_sha256, cfg.system_prompt)
            checked.chat_template = renderer.template
        room = room_error(cfg.sampling.max_new_tokens, facts.context_length)
        if room:
            raise UserError(room)
        from ..generation.constraints import check_constraint

        check_constraint(cfg.sampling, facts.tokenizer)
    except BaseException:
        checked.cleanup()
        raise
    return checked


def _chat_requests(checked: CheckedJob) -> int:
    """How many requests of an OpenAI batch file are chat completions (rows with messages)."""
    import pyarrow.parquet as pq

    messages = pq.read_table(checked.inputs.parquet(0), columns=["messages"]).column(0)
    return len(messages) - messages.null_count


def _build_job(cfg: GenerateConfig, checked: CheckedJob, numerics: Numerics) -> JobSpec:
    import pyarrow as pa

    from ..models.provenance import package_versions
    from .plan import plan_shards
    from .schema import encode_keep_schema

    inputs = checked.inputs
    columns = cfg.columns
    columns.id = columns.id if inputs.has_id else None
    identity = Identity(
        model_fingerprint=checked.fingerprint,
        sampling=cfg.sampling,
        job_seed=cfg.seed,
        columns=columns,
        inputs=[f.identity for f in inputs.files],
        shard_rows=cfg.shard_rows,
        engine=numerics,
        chat=checked.chat,
        logprobs=cfg.logprobs,
        return_tokens=cfg.return_tokens,
        requests=checked.requests,
        top_logprobs=cfg.logprob_columns[0],
        prompt_logprobs=cfg.logprob_columns[1],
    )
    keep = pa.schema([pa.field(c, inputs.types[c]) for c in columns.keep])
    out = Location(cfg.output)
    # Actors read a JSONL input's Parquet copy from OUT/_inputs/ (copied there once OUT is known to be this job's).
    files = [
        dataclasses.replace(f, staged=out.uri_of(mf.staged_name(i)) if i in inputs.staged else None)
        for i, f in enumerate(inputs.files)
    ]
    return JobSpec(
        identity=identity,
        output=out.uri,
        model=_model_spec(cfg),
        files=files,
        has_id=inputs.has_id,
        id_type=inputs.id_type,
        keep_schema=encode_keep_schema(keep),
        shards=plan_shards(inputs.files, cfg.shard_rows),
        versions=package_versions(),
        chat_template=checked.chat_template,
    )


def generate_dataset(config: GenerateConfig | None = None, **options) -> JobSummary:
    """Run (or resume) a generation job; returns its summary. Options are the CLI flags as keywords.

    Inputs and model are checked before Ray starts; then Ray is joined (`raycluster.connect_ray`).

    Example:
        generate_dataset(input="prompts.parquet", output="out/", model="my-model/", max_new_tokens=64)

    Raises:
        UserError: bad input, model or flags (nothing is written), or a job in `output` made differently.
    """
    from ..config import build_config
    from ..raycluster import connect_ray

    cfg = config or build_config(GenerateConfig, options)
    checked = check_job(cfg)
    try:
        if cfg.in_process:
            return _run(cfg, checked)
        started = connect_ray(cfg.address)
        try:
            return _run(cfg, checked)
        finally:
            if started:
                import ray

                ray.shutdown()
    finally:
        checked.cleanup()


@dataclass
class _Outcome:
    """What a run produced, for `_finish`."""

    records: dict[int, DoneRecord | None]
    failed: dict[int, str]
    skipped: int
    actors: int
    actor_restarts: int = 0
    retries: int = 0


def _run(cfg: GenerateConfig, checked: CheckedJob) -> JobSummary:
    from .cost import Meter
    from .progress import JobProgress
    from .runner import run_shards, run_shards_here, start_actors, stop_actors

    t0 = time.time()
    res = _local_resources(cfg) if cfg.in_process else _resources(cfg)
    engine = cfg.engine.resolved(res.device, checked.parameters, res.threads)
    check_kv_memory(cfg, checked, engine, res.num_actors)
    job = _build_job(cfg, checked, Numerics.of(engine))
    meter = Meter(Session(started=t0, device=res.device_type))
    job.sessions.append(meter.session)
    out = Location(job.output)
    pending, skipped, records = _prepare_output(cfg, job, out, t0, checked.inputs.staged)
    outcome = _Outcome(records, {}, skipped, 0)
    total_rows = sum(s.rows for s in job.shards)
    progress = JobProgress(len(job.shards), total_rows, quiet=cfg.quiet, already=[r for r in records.values() if r])
    actors: list = []
    engine = job.engine_config(refill=engine.refill, threads=engine.threads)
    try:
        if pending:
            n = 1 if cfg.in_process else min(res.num_actors, len(pending))
            meter.start(dataclasses.replace(res, num_actors=n).devices)
        if pending and not cfg.in_process:
            actors = start_actors(engine, n, res.cpus_per_actor, res.gpus_per_actor)
            meter.update()  # the devices held while the actors loaded count even if this run is killed next
            mf.write_job(out, job)

        def done(rec: DoneRecord) -> None:
            records[rec.shard] = rec
            progress.shard_done(rec)
            if meter.due():  # a killed run's devices count too
                mf.write_job(out, job)

        def fail(shard: int, err: str) -> None:
            outcome.failed[shard] = err
            progress.shard_failed(shard, err)

        with progress:
            if pending:
                run = dict(batch_size=cfg.batch_size, max_attempts=cfg.max_shard_attempts, on_done=done, on_fail=fail)
                if cfg.in_process:
                    stats = run_shards_here(engine, job, pending, **run)
                else:
                    stats = run_shards(actors, job, pending, on_tick=progress.tick, on_note=progress.note, **run)
                outcome.actors = stats.actors_started
                outcome.actor_restarts, outcome.retries = stats.actor_restarts, stats.retries
    finally:
        stop_actors(actors)
        meter.stop()
    return _finish(job, out, outcome, t0, progress, cfg.price_per_hour)


def _prepare_output(
    cfg: GenerateConfig, job: JobSpec, out: Location, t0: float, staged: dict[int, str]
) -> tuple[list[int], int, dict[int, DoneRecord | None]]:
    """Check or create OUT, clean leftovers, write the manifest, copy the Parquet copies of JSONL inputs (`staged`:
    file index -> local file) into OUT/_inputs/ when shards are left to do; returns (pending shards, skipped, done
    records).

    A finished shard is trusted only when its part file has the size and sha256 its record states.
    """
    old = mf.read_job(out)
    # checked before anything is deleted or written: --overwrite removes a job's files, never someone else's
    foreign = mf.foreign_files(out, len(old.shards) if old is not None else 0)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise UserError(
            f"--output {out} holds files that are not this job's ({', '.join(foreign[:5])}{more}): readers of the "
            "folder (pandas, pyarrow, DuckDB, ...) would read them as result rows. Use a new or empty --output, or "
            "move them away"
        )
    if old is not None and cfg.overwrite:
        mf.wipe(out)
        old = None
    if old is not None:
        try:
            mf.check_compatible(old, job.identity, out)
        except UserError:
            if out.list(mf.DONE_DIR, pattern="*.json"):
                raise
            # A job that finished no shard (refused, failed or stopped before its first) has no rows to mix with:
            # the corrected rerun starts again instead of being refused.
            log.warning("%s holds a job made differently that finished no shard: starting again", out)
            mf.wipe(out)
            old = None
    if old is not None:
        job.created = old.created or t0
        job.sessions = old.sessions + job.sessions
    out.mkdir()
    cleaned = mf.clean_tmp(out)
    if cleaned:
        log.warning("removed %d leftover temporary files from an interrupted run", cleaned)
    job.created = job.created or t0
    job.status = "running"
    mf.write_job(out, job)
    sizes = out.sizes(recursive=True)
    records = {s.shard: mf.done_record(out, s.shard, sizes) for s in job.shards}
    redo = [s for s, r in records.items() if r is None and mf.done_name(s) in sizes]
    if redo:
        log.warning("%d finished shard(s) no longer match their records (changed or damaged): redoing them", len(redo))
        for s in redo:
            out.delete(mf.done_name(s))
    pending = [s for s, r in records.items() if r is None]
    if pending:
        for i, local in staged.items():
            out.put_file(local, mf.staged_name(i))
    return pending, len(job.shards) - len(pending), records


def _finish(
    job: JobSpec, out: Location, outcome: _Outcome, t0: float, progress, price_per_hour: float | None = None
) -> JobSummary:
    """Record each shard's state and the summary (with what the job cost, over all its runs) in `_job.json`; a job
    whose every row failed is not complete."""
    from .cost import summary_fields

    records, failed = outcome.records, outcome.failed
    for s in job.shards:
        rec = records.get(s.shard)
        s.state = "done" if rec else "failed" if s.shard in failed else "pending"
        if rec:
            s.rows_out, s.tokens, s.errors, s.seconds = rec.rows_out, rec.tokens, rec.errors, rec.seconds
        s.error = failed.get(s.shard)
    done = [r for r in records.values() if r]
    tokens = sum(r.tokens for r in done)
    summary = JobSummary(
        status="incomplete",
        output=out.uri,
        shards=len(job.shards),
        shards_done=len(done),
        shards_skipped=outcome.skipped,
        shards_failed=len(failed),
        rows=sum(r.rows_out for r in done),
        error_rows=sum(r.errors for r in done),
        tokens=tokens,
        prompt_tokens=sum(r.prompt_tokens or 0 for r in done),
        tokens_per_second=round(progress.session_tokens / max(progress.elapsed, 1e-9), 1),
        seconds=round(time.time() - t0, 2),
        actors=outcome.actors,
        actor_restarts=outcome.actor_restarts,
        retries=outcome.retries,
        **summary_fields(job.sessions, tokens, price_per_hour),
        failed={str(k): v for k, v in failed.items()},
    )
    if len(done) == len(job.shards):
        summary.status = "complete"
        if summary.rows and summary.error_rows == summary.rows:
            first = next((r.first_error for r in done if r.first_error), None)
            summary.status = "failed"
            summary.failed["all"] = f"every one of the {summary.rows} rows is an error row; the first: {first}"
    elif failed:
        summary.status = "failed"
    job.status = summary.status
    job.summary = summary.to_json()
    job.failed = summary.failed
    mf.write_job(out, job)
    progress.summary(summary)
    return summary
