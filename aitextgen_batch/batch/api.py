"""`generate_dataset`: Parquet or JSONL prompts (or chat messages) in, Parquet results out, on Ray; resumable and
exactly once."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from ..config import check, check_at_most, check_range, check_seed
from ..generation.options import EngineConfig
from ..generation.params import SamplingParams
from ..storage import Location
from . import manifest as mf
from .checks import CheckedJob, check_job, check_kv_memory
from .executor import Outcome, ShardExecutor, make_executor
from .executor.state import JobSummary
from .manifest import Columns, Identity, JobSpec, ModelSpec, Numerics, Session

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
        from .schema import optional_fields, output_names

        reserved = output_names(
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
        from .schema import logprob_columns

        return logprob_columns(self.sampling, self.params_column is not None or self.input_format == "openai-batch")

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
        model=ModelSpec.of(cfg.engine),
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

    Inputs and model are checked before any worker starts (`checks.check_job`); then the executor the flags ask for
    (`executor.make_executor`: this process with `in_process`, else Ray actors, joining Ray) runs the pending shards.

    Example:
        generate_dataset(input="prompts.parquet", output="out/", model="my-model/", max_new_tokens=64)

    Raises:
        UserError: bad input, model or flags (nothing is written), or a job in `output` made differently.
    """
    from ..config import build_config

    cfg = config or build_config(GenerateConfig, options)
    checked = check_job(cfg)
    try:
        with make_executor(cfg) as executor:
            return _run(cfg, checked, executor)
    finally:
        checked.cleanup()


def _run(cfg: GenerateConfig, checked: CheckedJob, executor: ShardExecutor) -> JobSummary:
    """Decide the engine's numerics where the workers run, write the manifest, run the pending shards, record the
    outcome."""
    from .cost import Meter
    from .executor.state import finish, prepare_output
    from .progress import JobProgress

    t0 = time.time()
    res = executor.resources()
    resolved = cfg.engine.resolved(res.device, checked.parameters, res.threads)
    check_kv_memory(cfg, checked, resolved, res.num_actors, executor.local_memory)
    job = _build_job(cfg, checked, Numerics.of(resolved))
    meter = Meter(Session(started=t0, device=res.device_type))
    job.sessions.append(meter.session)
    out = Location(job.output)
    pending, skipped, records = prepare_output(job, out, t0, checked.inputs.staged, cfg.overwrite)
    outcome = Outcome(records, skipped)
    already = [r for r in records.values() if r]
    progress = JobProgress(len(job.shards), sum(s.rows for s in job.shards), quiet=cfg.quiet, already=already)
    try:
        with progress:
            if pending:
                config = job.engine_config(refill=resolved.refill, threads=resolved.threads)
                executor.run(job, config, pending, outcome, progress, meter)
    finally:
        meter.stop()
    return finish(job, out, outcome, t0, progress, cfg.price_per_hour)
