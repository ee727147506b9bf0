"""Config dataclasses of the generation commands (engine options, replay), and the one place that decides the
engine's numeric defaults (dtype, slots, prefill rows, threads): `EngineConfig.resolved` for a job's driver,
`engine_shapes` for an `Engine` built without them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..config import check, check_at_most, check_range, check_seed
from ..errors import UserError
from .params import MAX_RETURN_SEQUENCES, SamplingParams

MAX_SLOTS = 4096  # rows per decode step: more is a multi-GB cache for the smallest model
MAX_THREADS = 1024
# Versions of the engine's arithmetic: a job made by one cannot be resumed or replayed by another.
NUMERICS_VERSION = 3


def default_slots(device: str, weight_bytes: int) -> int:
    """Rows per decode step when none are given, from the device and the model's weights (bytes in the run's dtype).

    A decode step multiplies `slots` rows by every weight matrix: with few rows the time goes to reading the weights
    and to per-step overhead, with many rows to arithmetic, and a step's rows share its cost. On a CPU, 64 rows run a
    small model's matmuls near their best rate (2 threads: 32 rows reach about 80% of it); on a GPU several hundred.
    Larger models take fewer rows: their steps are long anyway, and their KV cache per row is larger.
    CPU: 64 below 1 GB of weights, 32 below 4 GB, else 16. CUDA: 256 below 2 GB, 128 below 16 GB, else 64.
    """
    gb = weight_bytes / 1e9
    if str(device).startswith("cuda"):
        return 256 if gb < 2 else 128 if gb < 16 else 64
    return 64 if gb < 1 else 32 if gb < 4 else 16


def default_prefill_rows(slots: int) -> int:
    """Rows per prefill: an eighth of the slots (at least 2), so a refill waits for few free slots."""
    return min(slots, max(2, slots // 8))


def engine_shapes(device: str, weight_bytes: int, slots: int | None, prefill_rows: int | None) -> tuple[int, int]:
    """(slots, prefill rows): the ones given, else the defaults for the device and the weights' bytes.

    Raises:
        UserError: fewer than 2 slots (a 1-row matmul takes another kernel path), or prefill rows outside 2..slots.
    """
    slots = int(slots or default_slots(device, weight_bytes))
    if slots < 2:
        raise UserError(f"slots must be >= 2 (a 1-row matmul takes another kernel path), got {slots}")
    prefill_rows = int(prefill_rows or default_prefill_rows(slots))
    if not 2 <= prefill_rows <= slots:
        raise UserError(f"prefill_rows must be between 2 and slots ({slots}), got {prefill_rows}")
    return slots, prefill_rows


@dataclass
class EngineConfig:
    """Which model to load and how to run it."""

    model: str = field(
        default="", metadata={"help": "model folder, cached hub id, or preset (with --tokenizer); default: the bundled"}
    )
    tokenizer: Path | None = field(default=None, metadata={"help": "tokenizer folder (presets; else the model's)"})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, cuda:1... (default: cuda if available)"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16, float16 (default per device)"})
    slots: int | None = field(
        default=None, metadata={"help": "rows per forward pass (fixed shape; part of the numerics), >= 2"}
    )
    prefill_rows: int | None = field(
        default=None, metadata={"help": "rows per prefill (fixed shape; part of the numerics), 2..slots"}
    )
    refill: bool = field(
        default=True, metadata={"help": "start a waiting item in a slot as soon as its item ends (speed only)"}
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads, >= 1"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run model code shipped with the weights"})
    allow_pickle: bool = field(default=False, metadata={"help": "accept pytorch_model.bin (pickle) weights"})

    def __post_init__(self):
        from ..models.loading import DTYPE_NAMES

        if self.slots is not None:
            check_range("slots", self.slots, 2)
            check_at_most("slots", self.slots, MAX_SLOTS, " (each slot holds a row's key/value cache)")
        if self.prefill_rows is not None:
            check_range("prefill_rows", self.prefill_rows, 2, self.slots or MAX_SLOTS)
        if self.threads is not None:
            check_range("threads", self.threads, 1)
            check_at_most("threads", self.threads, MAX_THREADS)
        if self.dtype is not None:
            check(self.dtype in DTYPE_NAMES, "dtype", f"must be one of {', '.join(DTYPE_NAMES)}", self.dtype)

    def resolved(self, device: str, parameters: int = 0, threads: int = 1) -> EngineConfig:
        """This config with every numeric default decided, as a job records it and its workers build it.

        Args:
            device: the device kind the engine runs on ("cpu" or "cuda").
            parameters: the model's parameter count (the default slots follow its weights' bytes in the dtype).
            threads: torch CPU threads when `threads` is not set (a CPU matmul splits its sums by thread count).

        Raises:
            UserError: slots or prefill rows out of range (`engine_shapes`).
        """
        from ..models.loading import default_dtype_name, dtype_name, resolve_dtype

        dtype = dtype_name(self.dtype) if self.dtype else default_dtype_name(device)
        slots, prefill_rows = engine_shapes(
            device, parameters * resolve_dtype(dtype).itemsize, self.slots, self.prefill_rows
        )
        return dataclasses.replace(
            self,
            device=device,
            dtype=dtype,
            slots=slots,
            prefill_rows=prefill_rows,
            threads=int(self.threads or threads),
        )

    def build(self):
        """Load the engine these options describe. `threads` is not applied here: torch's thread count is
        process-wide, so entry points (the CLI, a Ray actor, the in-process executor) set it."""
        from .engine import Engine

        return Engine.from_pretrained(
            self.model,
            self.device,
            self.dtype,
            slots=self.slots,
            prefill_rows=self.prefill_rows,
            refill=self.refill,
            tokenizer=self.tokenizer,
            trust_remote_code=self.trust_remote_code,
            allow_pickle=self.allow_pickle,
        )

    def build_in_worker(self):
        """`build()` in a process that is its own entry point (a Ray actor): transformers' advisory logging is
        silenced and torch's thread count set to `threads` first, for the whole process."""
        import torch

        from ..models.loading import quiet_transformers

        quiet_transformers()
        if self.threads:
            torch.set_num_threads(self.threads)
        return self.build()


@dataclass
class ReplayConfig:
    """Regenerate one item (from a prompt and seed, or a row of a job's output) and print its text."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prompt: str | None = field(default=None, metadata={"help": "the item's prompt"})
    seed: int | None = field(default=None, metadata={"help": "the item's seed"})
    output: str | None = field(default=None, metadata={"help": "a generate job's output folder (with --id)"})
    id: str | None = field(default=None, metadata={"help": "the row's id in --output"})
    sample_index: int = field(default=0, metadata={"help": "which sample of the item, >= 0"})
    json: bool = field(default=False, metadata={"help": "print the whole result as JSON instead of the text"})
    chat: bool = field(
        default=False,
        metadata={"help": "render --prompt as one user message with the chat template, as generate --chat"},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "chat: a system message put first"})
    chat_template: str | None = field(
        default=None, metadata={"help": "chat: a Jinja chat template file (default: the tokenizer's)"}
    )

    def __post_init__(self):
        for name in ("system_prompt", "chat_template"):
            check(self.chat or getattr(self, name) is None, name, "is for a chat prompt: add --chat")
        if self.output is None:
            check(self.prompt is not None, "prompt", "is required (or pass --output OUT --id X)")
            check(self.seed is not None, "seed", "is required (or pass --output OUT --id X)")
        else:
            check(self.id is not None, "id", "is required with --output")
            unused = self._unused_with_output()
            check(
                not unused,
                unused[0] if unused else "output",
                "is not used with --output: replay regenerates the row with the job's own model files, tokenizer, "
                "engine and params (only --model for a moved model, --sample-index, --threads and --json apply); "
                "drop it",
            )
        if self.seed is not None:
            check_seed("seed", self.seed)
        check_range("sample_index", self.sample_index, 0)
        check_at_most("sample_index", self.sample_index, MAX_RETURN_SEQUENCES - 1)

    def _unused_with_output(self) -> list[str]:
        """The options given (not at their defaults) that replaying a job's row would ignore."""
        unused = [
            f.name
            for part in (self.engine, self.sampling)
            for f in dataclasses.fields(part)
            if f.name not in ("model", "threads") and getattr(part, f.name) != _default(f)
        ]
        return (
            unused
            + [name for name in ("prompt", "seed", "system_prompt", "chat_template") if getattr(self, name) is not None]
            + ["chat"] * self.chat
        )


def _default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def run_replay(cfg: ReplayConfig) -> int:
    """Print the item of `--prompt`/`--seed` (text, or JSON); exit 1 on a row error.

    Replaying a row of a job's output (`--output OUT --id X`) is the job layer's: `batch.verify.run_replay_row`.
    """
    import json

    from .seeds import sample_seed

    engine = cfg.engine.build()
    params = dataclasses.replace(cfg.sampling, num_return_sequences=1)
    prompt = cfg.prompt
    if cfg.chat:  # rendered as `generate --chat` renders a --prompt-column text: the same prompt, the same bytes
        from .chat import ChatRenderer

        prompt, err = ChatRenderer(engine.tokenizer, cfg.chat_template, cfg.system_prompt).render(
            [{"role": "user", "content": cfg.prompt}]
        )
        if err is not None:
            raise UserError(f"--prompt cannot be rendered as a chat message: {err}")
    result = engine.generate([prompt], [sample_seed(cfg.seed, cfg.sample_index)], params, batch_size=1)[0]
    result.sample_index = cfg.sample_index
    if cfg.json:
        print(json.dumps(dataclasses.asdict(result), ensure_ascii=False))
    elif result.error:
        print(f"error: {result.error}")
    else:
        print(result.text)
    return 1 if result.error else 0
