"""What the driver checks before any worker starts: inputs, output placement, the model, chat template, room for
the new tokens, constraints (`check_job`), and that the KV cache fits this machine (`check_kv_memory`)."""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import UserError
from ..generation.options import EngineConfig
from ..storage import Location
from .manifest import ChatSpec, RequestSpec

if TYPE_CHECKING:
    from .api import GenerateConfig


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
        chat_requests = _chat_requests(checked) if checked.requests else 0
        mode = "messages" if cfg.messages_column else "requests" if chat_requests else "prompt" if cfg.chat else None
        because = f"{cfg.input}: {chat_requests} request(s) are chat completions, but " if chat_requests else ""
        model = check_model(cfg.engine, cfg.sampling, mode, cfg.chat_template, cfg.system_prompt, because)
        checked.fingerprint = model.facts.fingerprint
        checked.config, checked.parameters = model.facts.config, model.facts.parameters
        checked.chat, checked.chat_template = model.chat, model.chat_template
    except BaseException:
        checked.cleanup()
        raise
    return checked


@dataclass
class ModelCheck:
    """What `check_model` found: the model's facts (`provenance.SourceFacts`: fingerprint, config, parameters,
    tokenizer, context length) and, for chat input, how rows are rendered and the template's text."""

    facts: object
    chat: ChatSpec | None = None
    chat_template: str | None = None


def check_model(
    engine: EngineConfig,
    sampling,
    chat_mode: str | None = None,
    chat_template: str | None = None,
    system_prompt: str | None = None,
    chat_because: str = "",
) -> ModelCheck:
    """The checks of a model and its params, before any worker loads it (`check_job`, `ray_data.build_processor`):
    the model loads (pickle weights are refused unless allowed, before any file is opened), a chat job's template
    renders (`chat_mode`: "prompt", "messages" or "requests"; None: no chat), `max_new_tokens` fits the context, the
    params' constraint suits the tokenizer.

    Raises:
        UserError: the first of those that fails (a template error prefixed by `chat_because`).
    """
    from ..generation.chat import ChatRenderer
    from ..generation.constraints import check_constraint
    from ..generation.prompts import room_error
    from ..models.provenance import inspect_source

    e = engine
    facts = inspect_source(e.model, e.tokenizer, e.trust_remote_code, e.allow_pickle)
    found = ModelCheck(facts)
    if chat_mode is not None:
        try:
            renderer = ChatRenderer(facts.tokenizer, chat_template, system_prompt)
        except UserError as exc:
            if not chat_because:
                raise
            raise UserError(f"{chat_because}{exc}") from None
        refused = renderer.refuses_every_row(every_row_is_one_user_message=chat_mode == "prompt")
        if refused:
            raise UserError(refused)
        found.chat = ChatSpec(chat_mode, renderer.template_sha256, system_prompt)
        found.chat_template = renderer.template
    room = room_error(sampling.max_new_tokens, facts.context_length)
    if room:
        raise UserError(room)
    check_constraint(sampling, facts.tokenizer)
    return found


def _chat_requests(checked: CheckedJob) -> int:
    """How many requests of an OpenAI batch file are chat completions (rows with messages)."""
    import pyarrow.parquet as pq

    messages = pq.read_table(checked.inputs.parquet(0), columns=["messages"]).column(0)
    return len(messages) - messages.null_count


def check_kv_memory(cfg: GenerateConfig, checked: CheckedJob, engine: EngineConfig, actors: int, local: bool) -> None:
    """Refuse, in seconds and with the sizes, a job whose KV cache cannot fit on this machine even for its shortest
    rows (CPU jobs on this machine: in-process, or a Ray this driver starts). Longer rows that do not fit become error
    rows in the engine (`Engine._fit`).

    Args:
        engine: the job's resolved engine config (`EngineConfig.resolved`).
        actors: workers, each with its own weights and cache; `local`: whether they share this machine's memory.

    Raises:
        UserError: `actors` caches of `slots` rows over the shortest row's length exceed the free memory.
    """
    from ..generation import memory
    from ..generation.engine import bucket_length, cache_length
    from ..models.loading import resolve_dtype

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
