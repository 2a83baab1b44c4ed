"""The running batch's KV cache layer appends in place and stays equal to transformers' concatenating layer."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from hub.kv_cache import RoomyLayer, roomy


def test_a_roomy_layer_appends_in_place_and_regrows_when_replaced_or_full():
    torch.manual_seed(0)
    start_k, start_v = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    cache = roomy(DynamicCache(ddp_cache_data=[(start_k, start_v)]))
    layer = cache.layers[0]
    assert isinstance(layer, RoomyLayer)
    ref_k, ref_v = start_k, start_v
    ptrs = set()
    for step in range(RoomyLayer.room + 3):  # past the spare columns once
        k, v = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
        keys, values = cache.update(k, v, 0)
        ref_k, ref_v = torch.cat([ref_k, k], -2), torch.cat([ref_v, v], -2)
        assert torch.equal(keys, ref_k) and torch.equal(values, ref_v)
        ptrs.add(keys.data_ptr())
    assert len(ptrs) == 2  # one buffer, then one regrowth when the room ran out: no copy per step
    layer.keys, layer.values = ref_k[:2, :, 3:].clone(), ref_v[:2, :, 3:].clone()  # rows left (as drop does)
    k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    keys, values = cache.update(k, v, 0)
    assert torch.equal(keys, torch.cat([ref_k[:2, :, 3:], k], -2))
    assert torch.equal(values, torch.cat([ref_v[:2, :, 3:], v], -2))
    assert cache.get_seq_length() == ref_k.shape[-2] - 3 + 1
