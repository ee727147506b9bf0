"""Models and tokenizers shared by the engine, the Ray actors and the trainer."""

from .fingerprint import model_fingerprint, tokenizer_fingerprint
from .loading import default_device, default_dtype, load_model, load_tokenizer, resolve_source
from .presets import PRESETS

__all__ = [
    "PRESETS",
    "default_device",
    "default_dtype",
    "load_model",
    "load_tokenizer",
    "model_fingerprint",
    "resolve_source",
    "tokenizer_fingerprint",
]
