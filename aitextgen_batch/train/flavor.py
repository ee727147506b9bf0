"""The Lightning package of this process: the one Ray Train uses, so that our module, callbacks and `pl.Trainer` are
of the same flavor as its `RayDDPStrategy`.

Ray Train imports `lightning.pytorch` when the `lightning` package is importable, else `pytorch_lightning`
(`ray.train.lightning._lightning_utils.import_lightning`). Where both are installed (NVIDIA's and many cluster images
ship `lightning`), a `pytorch_lightning.Trainer` refuses Ray's strategy as "an invalid strategy name": so never import
either package directly, import `pl` from here.
"""

from __future__ import annotations

try:
    import lightning.pytorch as pl
except ModuleNotFoundError:
    import pytorch_lightning as pl

__all__ = ["pl"]
