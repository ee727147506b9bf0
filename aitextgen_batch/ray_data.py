"""Generation as a Ray Data stage: `processor = build_processor(config); ds = processor(ds)`.

The shape is Ray Data LLM's (`ray.data.llm.build_llm_processor`): a config dataclass, a processor you call on a
`ray.data.Dataset`, and behind it `Dataset.map_batches` with an autoscaling pool of actors (`concurrency=n` or
`(min, max)`, `num_gpus`), each loading the engine once. Our promise holds inside a pipeline: a row's text depends
only on its prompt, seed and params, never on how Ray Data batches, orders or spreads the rows, so the same rows
through this stage and through `generate` (with the same model, engine shapes and threads) give the same bytes.

Input columns are `generate`'s: the prompt (or the chat messages), the id, and optionally a seed and per-row params.
Output columns are those of `generate`'s Parquet (id, sample_index, prompt, seed, text, counts, finish_reason,
error, valid, and the optional ones the config asks for), followed by every other input column, kept as it is (a row
that asks for n samples gives n output rows, each with the row's kept values). A bad row (no prompt, a template
that fails on its messages, invalid params, a prompt over the context) is an error row with its reason, never a
failed batch. An actor that dies is restarted by Ray Data and its batch is run again; since a row's bytes do not
depend on its batch, nothing changes.

Example:
    import ray
    from aitextgen_batch.ray_data import ProcessorConfig, build_processor

    processor = build_processor(ProcessorConfig(model="my-model/", sampling_params={"max_new_tokens": 64},
                                                 chat=True, concurrency=(1, 4)))
    ds = processor(ray.data.read_parquet("prompts/"))
    ds.write_parquet("out/")
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from .config import check, check_range, check_seed
from .errors import UserError
from .generation.options import EngineConfig
from .generation.params import SamplingParams, with_overrides

log = logging.getLogger("aitextgen_batch")

TOKENIZE_ROWS = 256  # prompts tokenized together (speed only), as `generate --batch-size`


@dataclass
class ProcessorConfig:
    """What a generation stage runs, and on what (names as in Ray Data LLM and `generate`).

    Args:
        model: a model folder, a cached hub id, or "" for the bundled default model (as `--model`).
        sampling_params: the rows' `SamplingParams`, or a dict of its fields (as the flags: `max_new_tokens`,
            `temperature`, `stop`, `json_schema`, ...); a row's params column overrides them for that row.
        seed: the job seed (>= 0): a row without a seed column value draws from (seed, id, sample index).
        prompt_column, messages_column, id_column, seed_column, params_column: input columns, as `generate`'s
            flags. `id_column` is required (ints or strings, unique: two rows with one id and no seed column draw the
            same seeds); `messages_column` replaces the prompt with a rendered conversation.
        chat, system_prompt, chat_template: chat rendering, as `--chat`, `--system-prompt`, `--chat-template`.
        logprobs, return_tokens: the optional output columns, as `--logprobs` and `--return-tokens`.
        concurrency: actors in the pool: n, or (min, max) to autoscale.
        batch_size: rows per `map_batches` call (per engine call); speed only, never the bytes.
        num_gpus, num_cpus: per actor. With `num_gpus` > 0 the engine runs on CUDA.
        device, dtype, slots, prefill_rows, threads: the engine's numerics, as the flags (defaults decided once, on
            the driver, as `generate` decides them); `threads` defaults to 1 on CPU.
        tokenizer, trust_remote_code, allow_pickle: as the flags.
    """

    model: str = ""
    sampling_params: SamplingParams | dict = field(default_factory=SamplingParams)
    seed: int = 0
    prompt_column: str = "prompt"
    messages_column: str | None = None
    id_column: str = "id"
    seed_column: str | None = None
    params_column: str | None = None
    chat: bool = False
    system_prompt: str | None = None
    chat_template: str | None = None
    logprobs: bool = False
    return_tokens: bool = False
    concurrency: int | tuple[int, int] = 1
    batch_size: int = 64
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    device: str | None = None
    dtype: str | None = None
    slots: int | None = None
    prefill_rows: int | None = None
    threads: int | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False

    def __post_init__(self):
        import re

        try:
            self._check()
        except UserError as exc:  # the shared checks name CLI flags: here the names are the config's fields
            raise UserError("ProcessorConfig: " + re.sub(r" \(--[a-z0-9-]+\)", "", str(exc))) from None

    def _check(self) -> None:
        if isinstance(self.sampling_params, dict):
            self.sampling_params = with_overrides(SamplingParams(), self.sampling_params)
        check(isinstance(self.sampling_params, SamplingParams), "sampling_params", "must be SamplingParams or a dict")
        check_seed("seed", self.seed)
        check_range("batch_size", self.batch_size, 1)
        check_range("num_gpus", self.num_gpus, 0.0)
        check_range("num_cpus", self.num_cpus, 0.0)
        sizes = self.concurrency if isinstance(self.concurrency, tuple) else (self.concurrency,)
        check(
            len(sizes) in (1, 2) and all(isinstance(n, int) and n >= 1 for n in sizes) and sizes[0] <= sizes[-1],
            "concurrency",
            "must be an int >= 1 or a (min, max) pair with 1 <= min <= max",
            self.concurrency,
        )
        check(
            not (self.chat and self.messages_column), "chat", "and messages_column both name the chat input; pass one"
        )
        for name in ("system_prompt", "chat_template"):
            check(
                self.chat or self.messages_column is not None or getattr(self, name) is None,
                name,
                "is for chat input: set chat=True or messages_column",
            )

    def engine_config(self) -> EngineConfig:
        """The engine options as given (numeric defaults not yet decided; `build_processor` decides them)."""
        device = self.device or ("cuda" if self.num_gpus > 0 else "cpu")
        return EngineConfig(
            model=self.model,
            tokenizer=Path(self.tokenizer) if self.tokenizer else None,
            device=device,
            dtype=self.dtype,
            slots=self.slots,
            prefill_rows=self.prefill_rows,
            threads=self.threads if self.threads is not None else (None if device.startswith("cuda") else 1),
            trust_remote_code=self.trust_remote_code,
            allow_pickle=self.allow_pickle,
        )


@dataclass
class StageSpec:
    """What every actor of the stage needs, decided once on the driver: the job's identity (model fingerprint,
    params, seed, columns, chat, numerics; as `generate` records it), the chat template's text and the engine."""

    job: object  # batch.manifest.JobSpec (no files, shards or output: the stage's rows come in batches)
    engine: EngineConfig


class Processor:
    """`processor(ds)`: `ds` with the stage appended (lazily, as any Ray Data transform)."""

    def __init__(self, config: ProcessorConfig, spec: StageSpec):
        self.config = config
        self.spec = spec

    def __call__(self, ds):
        """The rows of `ds` through the stage: a `ray.data.Dataset` of output rows (see the module docstring)."""
        from ray.data import ActorPoolStrategy

        from .batch.executor.ray import storage_runtime_env

        c = self.config
        schema = ds.schema(fetch_if_missing=False)  # known without running anything (read_parquet, from_arrow, ...)
        if schema is not None:
            check_columns(self.spec.job, schema.names, dict(zip(schema.names, schema.types, strict=True)))
        self._check_room()
        n = c.concurrency
        pool = ActorPoolStrategy(size=n) if isinstance(n, int) else ActorPoolStrategy(min_size=n[0], max_size=n[1])
        return ds.map_batches(
            GenerateStage,
            fn_constructor_args=(self.spec,),
            batch_size=c.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            compute=pool,
            num_gpus=c.num_gpus,
            num_cpus=c.num_cpus,
            runtime_env=storage_runtime_env(),  # the cache root and object-store settings, as generate's actors get
        )

    def _check_room(self) -> None:
        """Refuse a pool whose fixed actors would take every CPU of a fixed-size Ray: the read and other tasks of the
        pipeline would never be scheduled and Ray Data would wait forever, silently.

        Raises:
            UserError: the smallest pool's CPUs leave less than one CPU of the cluster free.
        """
        import ray

        if not ray.is_initialized():
            return
        c = self.config
        least = c.concurrency if isinstance(c.concurrency, int) else c.concurrency[0]
        cpus = ray.cluster_resources().get("CPU", 0.0)
        if c.num_gpus == 0 and cpus and least * c.num_cpus > cpus - 1:
            raise UserError(
                f"ProcessorConfig: concurrency {least} x num_cpus {c.num_cpus:g} takes {least * c.num_cpus:g} of the "
                f"Ray cluster's {cpus:g} CPUs, leaving none for reading and the pipeline's other tasks: Ray Data would "
                "wait forever. Pass a lower num_cpus (e.g. 0.5), concurrency=(1, n), or use a larger cluster"
            )


def check_columns(job, names: list[str], types: dict) -> tuple[str, list[str]]:
    """The stage's checks of a dataset's columns (`names`, `types`: name -> pyarrow type): the prompt (or messages)
    and id columns exist, ids are integers or strings, and no column the stage keeps has an output column's name.
    Returns (id type: "int" or "string", the kept columns in order).

    Raises:
        UserError: naming the column and the fix.
    """
    import pyarrow as pa

    from .batch.schema import job_fields, output_names

    cols = job.identity.columns
    for name, column in (("messages_column" if cols.messages else "prompt_column", cols.messages or cols.prompt),
                         ("id_column", cols.id)):  # fmt: skip
        if column not in names:
            raise UserError(
                f"ProcessorConfig.{name} {column!r} is not a column of the dataset (it has {', '.join(names)}); name "
                "the right column, or add one (ds.add_column)"
            )
    id_type = types[cols.id]
    if pa.types.is_integer(id_type):
        kind = "int"
    elif pa.types.is_string(id_type) or pa.types.is_large_string(id_type):
        kind = "string"
    else:
        raise UserError(
            f"ProcessorConfig.id_column {cols.id!r} holds {id_type}: ids must be integers or strings (cast the column)"
        )
    read = {cols.messages or cols.prompt, cols.id, cols.seed, cols.params} - {None}
    kept = [c for c in names if c not in read]
    clash = sorted(set(kept) & output_names(job_fields(job.identity)))
    if clash:
        raise UserError(
            f"input column(s) {', '.join(clash)} have the names of output columns: rename or drop them before the "
            "stage (ds.rename_columns / ds.drop_columns)"
        )
    return kind, kept


def build_processor(config: ProcessorConfig) -> Processor:
    """Check the model, chat template and params here, on the driver, as `generate` does before any work, and decide
    the engine's numerics once; returns the `Processor` to call on a dataset.

    Raises:
        UserError: a model that cannot load (pickle weights without allow_pickle), a chat job without a usable
            template, max_new_tokens beyond the model's context, a constraint the tokenizer cannot follow.
    """
    from .batch.checks import check_model
    from .batch.manifest import Columns, Identity, JobSpec, ModelSpec, Numerics
    from .batch.schema import logprob_columns
    from .models.provenance import package_versions

    e = config.engine_config()
    sampling = config.sampling_params
    mode = "messages" if config.messages_column else "prompt" if config.chat else None
    model = check_model(e, sampling, mode, config.chat_template, config.system_prompt)
    facts = model.facts
    resolved = e.resolved(e.device.split(":")[0], facts.parameters)  # the numerics, decided as `generate` does
    engine = dataclasses.replace(resolved, device=e.device, threads=e.threads)
    top, prompt = logprob_columns(sampling, per_row=config.params_column is not None)
    identity = Identity(
        model_fingerprint=facts.fingerprint,
        sampling=sampling,
        job_seed=config.seed,
        columns=Columns(
            prompt=config.prompt_column,
            id=config.id_column,
            seed=config.seed_column,
            keep=[],
            messages=config.messages_column,
            params=config.params_column,
        ),
        inputs=[],
        shard_rows=0,
        engine=Numerics.of(resolved),
        chat=model.chat,
        logprobs=config.logprobs,
        return_tokens=config.return_tokens,
        top_logprobs=top,
        prompt_logprobs=prompt,
    )
    job = JobSpec(
        identity=identity,
        output="",
        model=ModelSpec.of(e),
        files=[],
        has_id=True,
        id_type="int",
        keep_schema="",
        shards=[],
        versions=package_versions(),
        chat_template=model.chat_template,
    )
    return Processor(config, StageSpec(job, engine))


class GenerateStage:
    """The actor class behind the stage: loads the engine once (checking it is the model the driver checked), then
    turns each batch (a `pyarrow.Table`) into output rows."""

    def __init__(self, spec: StageSpec):
        self.spec = spec
        self.engine = spec.engine.build_in_worker()
        want = spec.job.identity.model_fingerprint
        if self.engine.fingerprint != want:
            raise UserError(
                f"the model this actor loaded ({spec.engine.model or 'the default model'}, fingerprint "
                f"{self.engine.fingerprint[:12]}) is not the one the driver checked ({want[:12]}): its files changed "
                "or differ on this node; rebuild the processor"
            )

    def __call__(self, batch):
        """One batch of input rows -> its output rows (pyarrow.Table)."""
        from .batch.shard import ShardRows, generate_items, plan_items, result_table

        job = self._batch_job(batch)
        ids = batch.column(job.identity.columns.id).to_pylist()
        rows = ShardRows(batch, ids, [f"the row with id {i!r}" for i in ids])
        prepared = plan_items(job, rows, self.engine.tokenizer)
        try:
            by_item = generate_items(self.engine, [prepared], TOKENIZE_ROWS)
        except Exception as exc:  # noqa: BLE001 - a row's failure is that row's: find it by running each item alone
            log.warning("a batch failed (%s: %s): generating its items one by one", type(exc).__name__, exc)
            by_item = self._one_by_one(prepared)
        return result_table(job, prepared, by_item).table

    def _one_by_one(self, prepared) -> dict:
        """Each item alone (its bytes are the same as in any batch); an item that raises is an error row with the
        exception. Raises RuntimeError when every item raised: the engine, not a row, is at fault."""
        from .generation.work import GenerationResult

        by_item, failed = {}, 0
        for i, (r, _, seed) in enumerate(prepared.items):
            if i in prepared.errors:
                continue
            try:
                (res,) = self.engine.generate([prepared.work.prompts[r]], [seed], [prepared.single[r]], 1)
            except Exception as exc:  # noqa: BLE001
                failed += 1
                res = GenerationResult(i, 0, seed, error=f"generation failed ({type(exc).__name__}: {exc})")
            by_item[(prepared.index, i)] = res
        if by_item and failed == len(by_item):
            raise RuntimeError(f"every row of the batch failed to generate; the first: {next(iter(by_item.values()))}")
        return by_item

    def _batch_job(self, batch):
        """The stage's job with this batch's id type and kept columns (every input column the stage does not read)."""
        import pyarrow as pa

        from .batch.schema import encode_keep_schema

        job = self.spec.job
        cols = job.identity.columns
        kind, kept = check_columns(job, batch.column_names, {f.name: f.type for f in batch.schema})
        if batch.column(cols.id).null_count:
            raise UserError(
                f"ProcessorConfig.id_column {cols.id!r} has null ids: every row needs an id (its seeds derive from it)"
            )
        keep = pa.schema([batch.schema.field(c) for c in kept])
        identity = dataclasses.replace(job.identity, columns=dataclasses.replace(cols, keep=kept))
        return dataclasses.replace(job, identity=identity, id_type=kind, keep_schema=encode_keep_schema(keep))
