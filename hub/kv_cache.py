"""A KV cache layer that appends in place, for the running batch of continuous decoding (hub/decode.py).

transformers' ``DynamicLayer`` appends a step's keys and values with ``torch.cat``: every decode step copies the
whole cache of every layer (7-13% of a 16-row step on the embedded model, measured with the profiler). A
``RoomyLayer`` keeps its keys and values as views of buffers with spare columns and writes each step's column
into them; it regrows (one copy, ``room`` spare columns) only when the room is used up or when the batch replaced
its tensors (rows joining: ``_join``; rows leaving: ``drop``). What a forward sees is the same tensors' values.
"""
from __future__ import annotations

from torch import Tensor
from transformers.cache_utils import DynamicLayer


class RoomyLayer(DynamicLayer):
    room = 32  # spare columns allocated at each regrowth

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        n, buf = key_states.shape[-2], getattr(self, "_buf", None)
        if buf is None or not self._views(buf) or self.keys.shape[-2] + n > buf[0].shape[-2]:
            buf = self._grow(n)
        length = self.keys.shape[-2]
        buf[0][:, :, length: length + n].copy_(key_states)
        buf[1][:, :, length: length + n].copy_(value_states)
        self.keys, self.values = buf[0][:, :, : length + n], buf[1][:, :, : length + n]
        return self.keys, self.values

    def _views(self, buf: tuple[Tensor, Tensor]) -> bool:
        """Whether keys and values are still the leading columns of the buffers (nobody replaced them)."""
        return all(t.data_ptr() == b.data_ptr() and t.shape[:2] == b.shape[:2] and t.stride() == b.stride()
                   for t, b in zip((self.keys, self.values), buf))

    def _grow(self, n: int) -> tuple[Tensor, Tensor]:
        bufs = []
        for t in (self.keys, self.values):
            rows, heads, length, dim = t.shape
            b = t.new_empty(rows, heads, length + n + self.room, dim)
            b[:, :, :length] = t
            bufs.append(b)
        self._buf = (bufs[0], bufs[1])
        self.keys, self.values = bufs[0][:, :, : self.keys.shape[-2]], bufs[1][:, :, : self.values.shape[-2]]
        return self._buf


def roomy(cache):
    """Make every layer of a DynamicCache a RoomyLayer, keeping its keys and values (no copy until it grows)."""
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, RoomyLayer):
            new = RoomyLayer()
            new.keys, new.values, new.is_initialized = layer.keys, layer.values, True
            new.device = getattr(layer, "device", layer.keys.device)
            cache.layers[i] = new
    return cache
