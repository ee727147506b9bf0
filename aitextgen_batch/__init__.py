"""aitextgen-batch: reproducible batch text generation and finetuning on Ray.

Importing the package is cheap: torch, transformers and ray load only when a name that needs them is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it, imported on first use
_LAZY = {
    "load_model": "aitextgen_batch.models.loading",
    "load_tokenizer": "aitextgen_batch.models.loading",
    "model_fingerprint": "aitextgen_batch.models.fingerprint",
    "train_tokenizer": "aitextgen_batch.tokenizer",
    "init_model": "aitextgen_batch.tokenizer",
    "UserError": "aitextgen_batch.errors",
    "Engine": "aitextgen_batch.generation.engine",
    "GenerationResult": "aitextgen_batch.generation.engine",
    "SamplingParams": "aitextgen_batch.generation.params",
    "derive_seed": "aitextgen_batch.generation.seeds",
    "TokenDataset": "aitextgen_batch.data",
    "generate_dataset": "aitextgen_batch.batch.api",
    "finetune": "aitextgen_batch.train",
    "FinetuneConfig": "aitextgen_batch.train",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'aitextgen_batch' has no attribute {name!r}")
