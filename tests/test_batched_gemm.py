"""Gather-free per-row LoRA through MKL's pointer-array batched GEMM, and where the stacked layer uses it."""
from __future__ import annotations

import pytest
import torch

from models import batched_gemm
from models.registry import ADAPTERS
from models.stacked import AdapterStack, build_stack
from tasks.schema import AdapterSpec


def reference(x, A, B, slots, scale):
    return torch.stack([scale * x[i] @ A[s].T @ B[s].T for i, s in enumerate(slots.tolist())])


def stacked_params(gen, n_slots=5, r=3, d_in=12, d_out=10):
    """A (S, r, in) and B (S, out, r) as strided views into one flat (S, D) tensor, as the stacked layer keeps them."""
    flat = torch.randn(n_slots, r * d_in + d_out * r + 7, generator=gen)
    return flat[:, : r * d_in].view(n_slots, r, d_in), flat[:, r * d_in: r * d_in + d_out * r].view(n_slots, d_out, r)


def test_mkl_batch_gemm_is_found_in_torch():
    assert batched_gemm.available()  # the pinned x86 CPU wheel exports cblas_sgemm_batch


def test_lora_rows_matches_per_row_products():
    gen = torch.Generator().manual_seed(0)
    A, B = stacked_params(gen)
    x = torch.randn(6, 4, 12, generator=gen)
    slots = torch.tensor([4, 0, 2, 2, 1, 4])  # repeats, out of order, not every slot
    with torch.no_grad():
        out = batched_gemm.lora_rows(x, A, B, slots, 0.5)
    assert out is not None and out.shape == (6, 4, 10)
    torch.testing.assert_close(out, reference(x, A, B, slots, 0.5), atol=1e-5, rtol=1e-5)


def test_lora_rows_declines_what_it_does_not_cover():
    gen = torch.Generator().manual_seed(1)
    A, B = stacked_params(gen)
    x, slots = torch.randn(3, 4, 12, generator=gen), torch.tensor([0, 1, 2])
    assert batched_gemm.lora_rows(x, A, B, slots, 1.0) is None  # autograd is on
    with torch.no_grad():
        assert batched_gemm.lora_rows(x.double(), A.double(), B.double(), slots, 1.0) is None
        assert batched_gemm.lora_rows(x.transpose(1, 2).contiguous().transpose(1, 2), A, B, slots, 1.0) is None
        with pytest.raises(IndexError, match="slots"):
            batched_gemm.lora_rows(x, A, B, torch.tensor([0, 1, 5]), 1.0)
        with pytest.raises(IndexError, match="slots"):
            batched_gemm.lora_rows(x, A, B, torch.tensor([0, 1]), 1.0)


def test_opt_out_by_environment(monkeypatch):
    monkeypatch.setenv("BORAHUB_NO_MKL_BATCH", "1")
    assert batched_gemm._load() is None
    monkeypatch.delenv("BORAHUB_NO_MKL_BATCH")
    assert batched_gemm._load() is not None


def test_stacked_layer_reads_adapters_in_place_for_mixed_prefill_only(monkeypatch):
    """Mixed rows of several tokens go through the pointer GEMMs (no gather) and equal the gather + bmm path;
    decode steps (one token per row) and blends keep gathering."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 10))
    model.requires_grad_(False)
    spec = AdapterSpec(rank=3, alpha=6, target_modules=["0"])
    stack = build_stack(model, [("g", spec, ADAPTERS["lora"], [0, 1, 2])], 3)
    (g,) = stack.groups
    g.flat = torch.randn(g.flat.shape) * 0.3
    lin, ids = model[0], torch.tensor([2, 0, 1, 2])
    calls = {"gemm": 0, "gather": 0}
    real_gemm, real_gather = batched_gemm._sgemm_batch, AdapterStack.gather

    def counted_gemm(*a):
        calls["gemm"] += 1
        return real_gemm(*a)

    def counted_gather(*a):
        calls["gather"] += 1
        return real_gather(*a)

    monkeypatch.setattr(batched_gemm, "_sgemm_batch", counted_gemm)
    monkeypatch.setattr(AdapterStack, "gather", counted_gather)

    def run(x, weights=None, route_ids=ids):
        calls.update(gemm=0, gather=0)
        stack.route(route_ids, weights)
        return lin(x), dict(calls)

    with torch.no_grad():
        x = torch.randn(4, 5, 12)
        fast, used = run(x)
        assert used == {"gemm": 2, "gather": 0}
        monkeypatch.setattr(batched_gemm, "_sgemm_batch", None)  # as without MKL
        slow, used = run(x)
        assert used == {"gemm": 0, "gather": 1}
        torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-6)
        monkeypatch.setattr(batched_gemm, "_sgemm_batch", counted_gemm)
        assert run(torch.randn(4, 1, 12))[1] == {"gemm": 0, "gather": 1}  # a decode step
        blend_ids, w = torch.stack([ids, ids.roll(1)], 1), torch.tensor([[0.5, 0.5]] * 4)
        assert run(x, w, blend_ids)[1] == {"gemm": 0, "gather": 1}
