"""A KV cache whose rows each write at their own position, and the attention masks that go with it.

Hugging Face's `StaticCache` writes every row of a batch at one shared position, so all rows must start
together. Slot refill needs the opposite: an item entering a slot mid-block must see exactly the layout
it would have had alone (prompt left-padded to its bucket, token `s` at cache index `bucket + s`),
because a row's attention results depend on where its keys sit. `SlotCache` keeps one buffer of
`(slots + 1, heads, length, head_dim)` per layer (the extra row absorbs the dummy rows of a prefill)
and writes:

- in a prefill, the new rows' keys at cache rows `prefill_rows`, positions `[0, bucket)`; attention runs over
  the prefill's own keys only;
- in a decode step, one key per row at `write_at[row]`; attention runs over the first positions, as many as
  the mask is wide (`attention.slot_attention`), in chunks.

A row's later positions keep what an earlier item of its slot wrote there: masked, they weigh exactly 0,
and only finite values are ever written (a zeroed buffer to start with, and `nan_to_num` on every write).

The model receives ready-made 4D additive masks (Hugging Face passes a 4D mask through untouched), one
per attention kind: sliding-window layers see only the last `sliding_window` positions, as in the
model's own masks. Every write is in place into preallocated tensors, so a step can be captured in a
CUDA graph.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..errors import UserError

FULL = "full_attention"
SLIDING = "sliding_attention"


class MaskKinds:
    """Which attention masks a model needs: `{kind: sliding window or None}`, and whether it takes a dict."""

    def __init__(self, config):
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) is False:
            window = None
        types = getattr(config, "layer_types", None)
        if types:
            unknown = sorted(set(types) - {FULL, SLIDING})
            if unknown:
                raise UserError(
                    f"model type {config.model_type!r} has attention layers of kind {', '.join(unknown)}, which "
                    "the batch-invariant engine cannot serve (it supports full and sliding-window attention)"
                )
            self.by_kind = {kind: (window if kind == SLIDING else None) for kind in sorted(set(types))}
            self.keyed = True
        else:
            self.by_kind = {FULL: window}
            self.keyed = False

    def build(self, visible) -> dict | torch.Tensor:
        """Masks for the model: `visible(window)` gives a boolean (rows, queries, keys) tensor."""
        masks = {kind: visible(window) for kind, window in self.by_kind.items()}
        return masks if self.keyed else masks[FULL]


def additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(rows, q, k) bool -> (rows, 1, q, k) additive mask in `dtype`: 0 where visible, the dtype's minimum elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.finfo(dtype).min)[:, None]


def prefill_masks(kinds: MaskKinds, start: torch.Tensor, length: int, dtype: torch.dtype):
    """Causal masks for a left-padded prefill: row r's real tokens begin at `start[r]`."""
    q = torch.arange(length, device=start.device)[:, None]
    k = torch.arange(length, device=start.device)[None, :]

    def visible(window):
        v = (k[None] >= start[:, None, None]) & (k <= q)[None]
        return v & (k > q - window)[None] if window else v

    return kinds.build(lambda w: additive(visible(w), dtype))


def decode_masks(kinds: MaskKinds, start: torch.Tensor, last: torch.Tensor, width: int, dtype: torch.dtype):
    """One-query masks over the first `width` cache positions: row r sees `start[r] .. last[r]` (its own keys, the new
    one last). The attention reads only those `width` positions (`attention.slot_attention`)."""
    k = torch.arange(width, device=start.device)[None, :]

    def visible(window):
        v = (k >= start[:, None]) & (k <= last[:, None])
        return (v & (k > last[:, None] - window) if window else v)[:, None]

    return kinds.build(lambda w: additive(visible(w), dtype))


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values for every slot (see the module docstring)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, cache: SlotCache):
        super().__init__()
        self.cache = cache

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        rows, length = self.cache.rows + 1, self.cache.length
        heads = key_states.shape[1]
        self.keys = torch.zeros(
            (rows, heads, length, key_states.shape[-1]), dtype=key_states.dtype, device=key_states.device
        )
        self.values = torch.zeros(
            (rows, heads, length, value_states.shape[-1]), dtype=value_states.dtype, device=value_states.device
        )
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        c = self.cache
        # Only finite values enter the cache: a row reads (with weight exactly 0) positions that an earlier item of its
        # slot wrote, and 0 * inf would be NaN.
        key_states, value_states = torch.nan_to_num(key_states), torch.nan_to_num(value_states)
        if c.prefilling:
            width = key_states.shape[2]
            for buf, new in ((self.keys, key_states), (self.values, value_states)):
                buf[:, :, :width].index_copy_(0, c.prefill_rows, new)
            return key_states, value_states
        rows = c.rows
        for buf, new in ((self.keys, key_states), (self.values, value_states)):
            at = c.write_at.view(rows, 1, 1, 1).expand(rows, new.shape[1], 1, new.shape[-1])
            buf[:rows].scatter_(2, at, new)
        return self.keys[:rows], self.values[:rows]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.length, 0

    def get_seq_length(self) -> int:
        return 0  # positions are per row and always passed explicitly

    def get_max_length(self) -> int:
        return self.cache.length


class SlotCache(Cache):
    """Per-row-position KV cache for `rows` slots of `length` positions (plus one scratch row)."""

    def __init__(self, num_layers: int, rows: int, length: int, device):
        self.rows, self.length = rows, length
        self.prefilling = False
        self.prefill_rows: torch.Tensor | None = None
        self.write_at = torch.zeros(rows, dtype=torch.int64, device=device)
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values allocated so far (layers allocate on their first write)."""
        return sum(t.nbytes for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values))
