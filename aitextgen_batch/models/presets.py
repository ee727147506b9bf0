"""From-scratch model presets: architecture configs that take their vocabulary from a tokenizer."""

from __future__ import annotations

from ..errors import UserError

# model_type plus the config fields that differ from that architecture's defaults.
PRESETS: dict[str, dict] = {
    "tiny": {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 256},
    "small": {"model_type": "gpt2", "n_layer": 6, "n_head": 6, "n_embd": 384, "n_positions": 512},
    "gpt2-124m": {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024},
    "gpt2-355m": {"model_type": "gpt2", "n_layer": 24, "n_head": 16, "n_embd": 1024, "n_positions": 1024},
    "gpt2-774m": {"model_type": "gpt2", "n_layer": 36, "n_head": 20, "n_embd": 1280, "n_positions": 1024},
    # A non-GPT-2 architecture, so the whole stack is exercised on rotary embeddings and RMSNorm too.
    "llama-tiny": {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
    },
}


def preset_config(name: str, tokenizer):
    """Build the config of preset `name` with vocabulary and special token ids taken from `tokenizer`.

    Raises:
        UserError: `name` is not a known preset.
    """
    from transformers import AutoConfig

    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    fields = dict(PRESETS[name])
    model_type = fields.pop("model_type")
    # The embedding must cover every id the tokenizer can produce, special tokens included.
    fields["vocab_size"] = len(tokenizer)
    fields["bos_token_id"] = tokenizer.bos_token_id
    fields["eos_token_id"] = tokenizer.eos_token_id
    fields["pad_token_id"] = tokenizer.pad_token_id
    return AutoConfig.for_model(model_type, **fields)
