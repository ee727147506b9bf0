"""The checks of one prompt, in one place: a job's rows and the engine's inputs get the same rules and messages."""

from __future__ import annotations

from ..config import unicode_error


def prompt_error(prompt, *, allow_empty: bool = False) -> str | None:
    """Why `prompt` cannot be generated from, or None.

    Args:
        prompt: the row's value.
        allow_empty: accept an empty or blank prompt (the engine then starts from bos alone, as finetune samples do);
            a job's rows refuse them.
    """
    if prompt is None:
        return "prompt is null"
    if not isinstance(prompt, str):
        return f"prompt must be a string, got {type(prompt).__name__}"
    if not allow_empty and not prompt.strip():
        return "prompt is empty"
    err = unicode_error(prompt)
    return None if err is None else f"prompt is not valid Unicode ({err})"


def room_error(max_new_tokens: int, context: int) -> str | None:
    """Why `max_new_tokens` leaves no room for any prompt in a `context`-token model, or None."""
    if context - max_new_tokens < 1:
        return (
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of {context} "
            f"tokens; lower --max-new-tokens (at most {context - 1})"
        )
    return None


def length_error(num_tokens: int, max_new_tokens: int, context: int) -> str | None:
    """Why a prompt of `num_tokens` tokens does not fit with `max_new_tokens` in `context`, or None."""
    if num_tokens > context - max_new_tokens:
        return (
            f"prompt has {num_tokens} tokens; with max_new_tokens={max_new_tokens} it exceeds the model's context of "
            f"{context}: shorten it, lower --max-new-tokens, or pass --truncate left"
        )
    return None
