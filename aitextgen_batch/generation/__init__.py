"""The single-process generation core: no Ray here."""

from .engine import Engine, GenerationResult
from .params import SamplingParams
from .seeds import derive_seed, sample_seed

__all__ = ["Engine", "GenerationResult", "SamplingParams", "derive_seed", "sample_seed"]
