"""Config dataclasses of the generation commands (engine options, replay)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import check, check_at_most, check_range, check_seed
from ..errors import UserError
from .params import MAX_RETURN_SEQUENCES, SamplingParams

MAX_SLOTS = 4096  # rows per decode step: more is a multi-GB cache for the smallest model
MAX_THREADS = 1024


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

    def build(self):
        """Load the engine these options describe. `threads` is not applied here: torch's thread count is
        process-wide, so entry points (the CLI, a Ray actor) set it."""
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
        import dataclasses

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
    import dataclasses

    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def run_replay(cfg: ReplayConfig) -> int:
    """Print the item of `--prompt`/`--seed` (text, or JSON); exit 1 on a row error.

    Replaying a row of a job's output (`--output OUT --id X`) is the job layer's: `batch.verify.run_replay_row`.
    """
    import dataclasses
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
