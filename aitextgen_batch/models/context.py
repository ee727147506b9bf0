"""The context length of a model: the one rule the engine, the job's checks and training all use."""

from __future__ import annotations

# Config fields that hold the longest sequence a model takes, in the order they are consulted.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
# For an architecture that records none of them (no learned positions): a length such models commonly handle.
DEFAULT_CONTEXT = 2048


def context_length(config) -> int:
    """The model's context length: the first of `CONTEXT_FIELDS` set in `config`, else `DEFAULT_CONTEXT`.

    Prompt plus generated tokens must fit it (generation), and so must a training block (finetuning).
    """
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CONTEXT
