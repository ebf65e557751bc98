"""A KV cache for sampling that writes each step in place instead of copying the past, and
that hands one row's past on to the next turn of a multi-turn episode.

transformers' `DynamicLayer` concatenates each step's keys and values onto the past ones, so
every decode step copies the whole cache (for 64 rows of SmolLM2-135M at 100 positions, ~300 MB
per step in float32). `PreallocatedLayer` writes them into a buffer with room for the whole
generation and hands the attention views of its filled part.

A multi-turn episode goes on after the environment's reply: `take_row` copies a finished
row's keys and values without its padding (`RowCache`), and `fill_rows` writes such pasts
into a new cache, so the next turn runs only the tokens after them. Imported only when
sampling (importing transformers takes seconds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """A full-attention layer cache whose `keys`/`values` are views of a preallocated buffer.

    Buffers are (batch, kv_heads, capacity, head_dim). Anything `DynamicLayer` does that replaces
    `keys` by a new tensor (`batch_repeat_interleave`, a `batch_select_indices` that cannot run
    in place) is followed, at the next `update`, by a new buffer holding a copy of it; `crop`
    keeps views of the same buffer, so the next `update` overwrites the cropped positions.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        past = self.get_seq_length()
        if past == 0:  # the prompt: `DynamicLayer` sets itself up (as each transformers version does)
            return super().update(key_states, value_states, *args, **kwargs)
        end = past + key_states.shape[-2]
        if not self._holds_views(key_states.shape[0], end):
            self._buffers = tuple(self._buffer_with(old, new, past, end) for old, new in
                                  ((self.keys, key_states), (self.values, value_states)))
        keys, values = self._buffers
        keys[:, :, past:end] = key_states
        values[:, :, past:end] = value_states
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` of the batch; in place when each row is read before it is overwritten.

        Copying row indices[j] into row j in order of j is safe when indices[j] >= j for all j
        (sorted indices, or finished rows' slots filled from the end of the batch): then only the
        rows that move are copied, and no buffer is allocated.
        """
        order, end = indices.tolist(), self.get_seq_length()
        in_place = (end > 0 and len(order) <= len(self.keys) and self._holds_views(len(self.keys), end)
                    and all(src >= dst for dst, src in enumerate(order)))
        if not in_place:
            return super().batch_select_indices(indices)
        keys, values = self._buffers
        for dst, src in enumerate(order):
            if src != dst:
                keys[dst, :, :end] = keys[src, :, :end]
                values[dst, :, :end] = values[src, :, :end]
        self._buffers = keys[: len(order)], values[: len(order)]
        self.keys, self.values = self._buffers[0][:, :, :end], self._buffers[1][:, :, :end]

    def _holds_views(self, batch: int, end: int) -> bool:
        """True when `keys`/`values` are still views of the buffers and `end` positions fit."""
        if self._buffers is None:
            return False
        keys, values = self._buffers
        return (keys.shape[0] == batch and end <= keys.shape[2]
                and self.keys.data_ptr() == keys.data_ptr() and self.keys.stride() == keys.stride()
                and self.values.data_ptr() == values.data_ptr() and self.values.stride() == values.stride())

    def _buffer_with(self, old: torch.Tensor, new: torch.Tensor, past: int, end: int) -> torch.Tensor:
        buffer = new.new_empty(*new.shape[:2], max(self.capacity, end), new.shape[-1])
        if past:
            buffer[:, :, :past] = old
        return buffer


def preallocated_cache(config, capacity: int) -> DynamicCache:
    """A `DynamicCache` for `config` whose full-attention layers are `PreallocatedLayer`s.

    capacity: positions each layer holds without reallocating (prompt width + new tokens).
    Other layer kinds (sliding windows, linear attention) stay as transformers builds them.
    """
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@dataclass
class RowCache:
    """One row's keys and values for its first `length` tokens, padding left out.

    layers: one (keys, values) pair per layer, each (kv_heads, length, head_dim), as the
    attention stored them (rotary position of token j already applied: positions 0..length-1).
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[-2]


def rows_can_be_taken(cache) -> bool:
    """True when every layer holds all past positions (full attention), so a row's past can be
    carried to another cache; sliding-window and linear-attention layers cannot."""
    return all(type(layer) is PreallocatedLayer for layer in cache.layers)


def take_row(cache, row: int, tokens: torch.Tensor) -> RowCache:
    """A copy of batch row `row` of `cache` at its token positions.

    tokens: (cache length,) bool, True at the row's tokens (its attention mask: False at padding).
    """
    # one nonzero for all layers: indexing by a boolean mask finds its positions again each time
    # (on a GPU, a wait for the device per layer)
    positions = tokens.nonzero().flatten()
    return RowCache([(layer.keys[row].index_select(-2, positions), layer.values[row].index_select(-2, positions))
                     for layer in cache.layers])


def fill_rows(cache, pasts: list[RowCache | None], width: int) -> None:
    """Write each row's past, right-aligned, into the first `width` positions of the empty `cache`.

    Row r holds `pasts[r]` at positions width - length .. width - 1 and zeros before it (a row
    whose past is None holds zeros only): the caller masks those positions out of attention.
    """
    ref = next(p for p in pasts if p is not None)
    for i, layer in enumerate(cache.layers):
        keys, values = ref.layers[i]
        keys = keys.new_zeros(len(pasts), keys.shape[0], width, keys.shape[-1])
        values = values.new_zeros(len(pasts), values.shape[0], width, values.shape[-1])
        for r, past in enumerate(pasts):
            if past is not None:
                keys[r, :, width - past.length:], values[r, :, width - past.length:] = past.layers[i]
        layer.update(keys, values)
