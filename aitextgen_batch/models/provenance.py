"""Provenance without loading a model: fingerprints from files, and the versions of what ran."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass
class SourceFacts:
    """What a job's driver learns about its model without loading it (a preset is built on the CPU)."""

    fingerprint: str
    context_length: int
    tokenizer: object = None  # the model's tokenizer (chat jobs render a probe conversation with it)
    config: object = None  # the model's config (KV-cache sizes)
    parameters: int = 0  # weights, counted once when tied


def inspect_source(
    source: str, tokenizer=None, trust_remote_code: bool = False, allow_pickle: bool = False
) -> SourceFacts:
    """The fingerprint `model_fingerprint` gives and the context length, from the folder's files when there is one.

    Hashing a folder streams its safetensors tensors one at a time, so the driver of a job never holds the model.
    A folder with pickle weights only is loaded (to hash it) only when `allow_pickle` says the user trusts it;
    otherwise `load_model` refuses it before any file is opened.
    """
    from .context import context_length
    from .fingerprint import combine, config_digest, model_fingerprint, tokenizer_fingerprint, weights_digest
    from .loading import check_tokenizer_fits, load_config, load_model, load_tokenizer, resolve_source

    resolved = resolve_source(source)
    folder = resolved.folder
    if folder is None or not list(Path(folder).glob("*.safetensors")):
        model, tok = load_model(
            source, device="cpu", tokenizer=tokenizer, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        )
        params = sum(p.numel() for p in model.parameters())
        return SourceFacts(
            model_fingerprint(model, tok, folder), context_length(model.config), tok, model.config, params
        )
    config = load_config(folder, trust_remote_code)  # first: the tokenizer's loader reads config.json too
    tok = load_tokenizer(tokenizer or folder, trust_remote_code=trust_remote_code)
    n_embed = getattr(config, "vocab_size", None) or len(tok)
    if len(tok) > n_embed:
        raise UserError(
            f"{source!r}: the tokenizer has {len(tok)} tokens but the model's embedding has only {n_embed} rows; use "
            "the tokenizer the model was trained with"
        )
    check_tokenizer_fits(folder, tok, tokenizer, n_embed, trust_remote_code)
    fingerprint = combine(weights_digest(None, folder, finite=True), config_digest(config), tokenizer_fingerprint(tok))
    return SourceFacts(fingerprint, context_length(config), tok, config, parameter_count(folder))


def parameter_count(folder) -> int:
    """Elements of the tensors in a folder's safetensors files, from their headers (no weight is read)."""
    import math

    from safetensors import safe_open

    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            total += sum(math.prod(sf.get_slice(k).get_shape()) for k in sf.keys())
    return total


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine or run a job, for its manifest."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("aitextgen-batch", "torch", "transformers", "tokenizers", "ray", "pyarrow", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    import platform

    out["python"] = platform.python_version()
    return out
