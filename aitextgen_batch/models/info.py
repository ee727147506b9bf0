"""`aitextgen-batch info`: what a model source is, at a glance, with its fingerprint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class InfoConfig:
    """Describe a model folder, a cached hub id, a preset, or a token cache (verifying its shards)."""

    source: str = field(
        default="", metadata={"help": "model folder, hub id, preset, or token cache folder", "positional": True}
    )
    tokenizer: Path | None = field(default=None, metadata={"help": "tokenizer folder (needed for presets)"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code shipped with the weights"})
    allow_pickle: bool = field(default=False, metadata={"help": "accept pytorch_model.bin (pickle) weights"})


def model_info(source: str, tokenizer=None, trust_remote_code: bool = False, allow_pickle: bool = False) -> dict:
    """Load `source` on CPU and describe it: kind, architecture, size, vocabulary and fingerprint."""
    from ..generation.engine import eos_token_ids
    from .context import context_length
    from .fingerprint import model_fingerprint
    from .loading import load_model, resolve_source

    resolved = resolve_source(source)
    model, tok = load_model(
        source, device="cpu", tokenizer=tokenizer, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    cfg = model.config
    about = {}
    if resolved.kind == "default":
        from .default import describe_default

        about = describe_default()
    return {
        "source": source or "(the default model)",
        **about,
        "kind": resolved.kind,
        "folder": str(resolved.folder) if resolved.folder else None,
        "architecture": type(model).__name__,
        "model_type": cfg.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": getattr(cfg, "num_hidden_layers", None),
        "hidden_size": getattr(cfg, "hidden_size", None),
        "context_length": context_length(cfg),
        "vocab_size": cfg.vocab_size,
        "tokenizer_size": len(tok),
        "bos/eos/pad": f"{tok.bos_token_id}/{tok.eos_token_id}/{tok.pad_token_id}",
        "chat template": "yes (--chat works)" if tok.chat_template else "none (--chat needs --chat-template FILE)",
        "eos ids": ", ".join(f"{i} {tok.convert_ids_to_tokens(i)!r}" for i in eos_token_ids(model, tok)) or "none",
        "fingerprint": model_fingerprint(model, tok, resolved.folder),
    }
