"""The memory a decoder's KV cache takes, sized before anything is allocated.

A decoder holds keys and values for `slots + 1` rows (the extra row absorbs a prefill's dummy rows) over its
cache length, in every layer: `(slots + 1) * length * bytes_per_position`, where a position costs
`layers * 2 * kv_heads * head_dim * dtype bytes`. SmolLM2-135M in fp32: 30 * 2 * 3 * 64 * 4 = 46,080 bytes, so
32 slots over 8,192 positions take 12.5 GB. The engine measures `bytes_per_position` on the model itself (a probe
prefill); a job's driver estimates it from the config (`estimate_bytes_per_position`) to refuse or fit its slots in
seconds, before Ray starts.
"""

from __future__ import annotations

# Share of the free memory a KV cache may take: the rest is for activations, the sampler and the process.
USABLE = 0.8


def estimate_bytes_per_position(config, dtype_bytes: int) -> int | None:
    """KV-cache bytes per (slot, position) from a model config, or None when its fields are not the usual ones."""

    def first(*names):
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head", "num_heads")
    hidden = first("hidden_size", "n_embd", "d_model")
    if not (layers and heads and hidden):
        return None
    kv = first("num_key_value_heads", "num_kv_heads", "n_head_kv") or heads
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
        kv = 1
    head_dim = first("head_dim") or hidden // heads
    return layers * 2 * kv * head_dim * dtype_bytes


def available_bytes(device) -> int:
    """Memory free for new tensors on `device`: on CUDA the device's free memory plus what torch's caching allocator
    holds unused; on a CPU the system's available memory."""
    device = str(device)
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    import psutil

    return psutil.virtual_memory().available


def cache_bytes(slots: int, length: int, per_position: int) -> int:
    """Bytes of one decoder's KV cache."""
    return (slots + 1) * length * per_position


def fitting_slots(length: int, per_position: int, budget: int) -> int:
    """The most slots whose cache over `length` positions fits in `USABLE` of `budget` bytes."""
    return max(0, int(USABLE * budget) // (length * per_position) - 1)


def fitting_length(slots: int, per_position: int, budget: int, step: int = 64) -> int:
    """The longest cache (a multiple of `step`) that `slots` slots can hold in `USABLE` of `budget` bytes."""
    return int(USABLE * budget) // ((slots + 1) * per_position) // step * step


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def describe(slots: int, length: int, per_position: int) -> str:
    """`32 slots x 8,192 positions x 46,080 bytes = 12.49 GB` (the sizes behind a refusal)."""
    total = cache_bytes(slots, length, per_position)
    return f"{slots} slots (+1 scratch row) x {length:,} positions x {per_position:,} bytes = {gb(total)}"
