"""Finetuning on Ray Train: `finetune(...)`, the `aitextgen-batch finetune` command, and their config.

Layout: `config.py` (options), `api.py` (driver: checks, launch, summary), `worker.py` (Ray Train worker loop),
`module.py` and `datamodule.py` (Lightning, no Ray), `callbacks.py` (metrics, saves, samples), `state.py` (saved
steps without pickle), `plot.py` (loss curve), `progress.py` (driver progress). Importing this package loads no
torch, Lightning or Ray.
"""

from __future__ import annotations

from .api import finetune, run_finetune
from .config import FinetuneConfig

__all__ = ["FinetuneConfig", "finetune", "run_finetune"]
