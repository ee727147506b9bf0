"""Token caches for finetuning: streamed, sharded MessagePack files with an index (see `cache.py` for the format).

`TokenDataset` opens, builds and merges caches and draws training samples; `prepare` and `info CACHE` are the
commands (`commands.py`). Importing this package loads neither torch nor transformers.
"""

from __future__ import annotations

from .dataset import Sampler, TokenDataset

__all__ = ["Sampler", "TokenDataset"]
