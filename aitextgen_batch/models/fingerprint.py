"""Stable fingerprints of a model (weights + config + tokenizer), stored with every output for provenance.

The hash covers what determines generations and nothing incidental: tensor names, dtypes, shapes and
bytes in sorted name order (not the file's byte layout), the config without bookkeeping keys, and the
tokenizer's canonical JSON with its special tokens.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

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


def _hash_tensor(h, name: str, tensor) -> None:
    import torch

    t = tensor.detach().to("cpu").contiguous()
    h.update(f"{name}|{str(t.dtype)}|{tuple(t.shape)}|".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def weights_digest(model=None, folder: str | Path | None = None) -> str:
    """Hex digest of the weights: from the safetensors files in `folder` when given, else the model's tensors."""
    h = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors")) if folder is not None else []
    if files:
        from safetensors import safe_open

        tensors = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    tensors[key] = (f, key)
        for key in sorted(tensors):
            f, k = tensors[key]
            with safe_open(str(f), framework="pt") as sf:
                _hash_tensor(h, key, sf.get_tensor(k))
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
