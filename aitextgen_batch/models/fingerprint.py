"""Stable fingerprints of a model (weights + config + tokenizer), stored with every output for provenance.

The hash covers what determines generations and nothing incidental: tensor names, dtypes, shapes and
bytes in sorted name order (not the file's byte layout), the config without bookkeeping keys, and the
tokenizer's canonical JSON with its special tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import UserError

# Config keys that record where or how a model was loaded, not what it computes.
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "_attn_implementation",
    "attn_implementation",
    "_commit_hash",
    "architectures",
}


NOT_FINITE = "holds NaN or infinite values: the model cannot generate (a training run that diverged saves such weights)"


def non_finite(tensor) -> bool:
    """Whether a floating-point tensor holds a NaN or an infinity."""
    import torch

    return bool(tensor.is_floating_point() and not torch.isfinite(tensor).all())


def _hash_tensor(h, name: str, tensor) -> None:
    import torch

    t = tensor.detach().to("cpu").contiguous()
    h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def weights_digest(model=None, folder: str | Path | None = None, *, finite: bool = False) -> str:
    """Hex digest of the weights: from the safetensors files in `folder` when given, else the model's tensors.

    Args:
        finite: refuse weights holding NaN or infinite values (checked on the tensors as they are hashed).

    Raises:
        UserError: a safetensors file that cannot be read (truncated, not safetensors), or with `finite`, a tensor
            that is not finite; each named.
    """
    h = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors")) if folder is not None else []
    if files:
        tensors = {}
        for f in files:
            with _open_safetensors(f) as sf:
                for key in sf.keys():
                    tensors[key] = (f, key)
        for key in sorted(tensors):
            f, k = tensors[key]
            with _open_safetensors(f) as sf:
                t = _read_tensor(sf, f, k)
            if finite and non_finite(t):
                raise UserError(f"{str(folder)!r}: weight {key!r} {NOT_FINITE}; use another model or checkpoint")
            _hash_tensor(h, key, t)
    else:
        # A tied tensor is hashed once, under the last of its names: the name save_pretrained keeps
        # (`transformer.wte.weight` over `lm_head.weight`), so a model hashes the same before and after saving.
        names: dict[int, str] = {}
        state = model.state_dict()
        for name, tensor in state.items():
            names[tensor.data_ptr()] = max(name, names.get(tensor.data_ptr(), name))
        for name in sorted(names.values()):
            _hash_tensor(h, name, state[name])
    return h.hexdigest()


def _open_safetensors(path: Path):
    """`safe_open` of a weights file; a file it cannot read is a UserError naming it."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # SafetensorError (not an OSError) for a truncated or foreign file
        raise UserError(_unreadable(path, exc)) from exc


def _read_tensor(sf, path: Path, key: str):
    try:
        return sf.get_tensor(key)
    except Exception as exc:  # the header promises more bytes than the file holds
        raise UserError(_unreadable(path, exc)) from exc


def _unreadable(path: Path, exc: Exception) -> str:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{str(path)!r} is not a readable safetensors file ({first}): truncated or damaged; copy or save it again"


def config_digest(config) -> str:
    """Hex digest of a model config without load-time bookkeeping keys."""
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hex digest of a fast tokenizer: its canonical JSON (vocab, merges, normalizers) and special tokens."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    special = {
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token,
        "unk": tokenizer.unk_token,
    }
    blob = json.dumps({"backend": backend, "special": special}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def combine(weights: str, config: str, tokenizer: str) -> str:
    """The model fingerprint (`sha256:` + 16 hex digits) from the three digests."""
    return "sha256:" + hashlib.sha256("|".join([weights, config, tokenizer]).encode()).hexdigest()[:16]


def model_fingerprint(model, tokenizer, folder: str | Path | None = None) -> str:
    """A stable fingerprint of weights, config and tokenizer together (see `combine`)."""
    return combine(weights_digest(model, folder), config_digest(model.config), tokenizer_fingerprint(tokenizer))
