"""Provenance without loading a model: fingerprints from files, and the versions of what ran."""

from __future__ import annotations

from pathlib import Path


def fingerprint_source(source: str, tokenizer=None, trust_remote_code: bool = False) -> str:
    """The fingerprint `model_fingerprint` gives, computed from the folder's files when there is one.

    Hashing a folder streams its safetensors tensors one at a time, so the driver of a job never holds
    the model; presets (no folder) are built on the CPU to hash.
    """
    from .fingerprint import combine, config_digest, tokenizer_fingerprint, weights_digest
    from .loading import load_model, load_tokenizer, quiet_transformers, resolve_source

    quiet_transformers()
    resolved = resolve_source(source)
    folder = resolved.folder
    if folder is None or not list(Path(folder).glob("*.safetensors")):
        from .fingerprint import model_fingerprint

        model, tok = load_model(
            source, device="cpu", tokenizer=tokenizer, trust_remote_code=trust_remote_code, allow_pickle=True
        )
        return model_fingerprint(model, tok, folder)
    from transformers import AutoConfig

    tok = load_tokenizer(tokenizer or folder, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code, local_files_only=True)
    return combine(weights_digest(None, folder), config_digest(config), tokenizer_fingerprint(tok))


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
