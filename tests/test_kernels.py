"""models/kernels.py: oneDNN's float32 matmul where it is the faster kernel, PyTorch's elsewhere, same results."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_lm
from models import kernels

pytestmark = pytest.mark.skipif(kernels._onednn_op() is None, reason="this torch build has no oneDNN linear op")


@pytest.fixture
def table(monkeypatch):
    """A clean process-wide choice table, restored afterwards."""
    saved = dict(kernels._ONEDNN)
    kernels._ONEDNN.clear()
    yield kernels._ONEDNN
    kernels._ONEDNN.clear()
    kernels._ONEDNN.update(saved)


def test_chosen_kernel_agrees_with_pytorch(table):
    W, x, y, b = torch.randn(48, 32), torch.randn(5, 32), torch.randn(5, 48), torch.randn(48)
    assert kernels.linear_add(y, x, W) is None  # not chosen: the caller accumulates itself
    table[(48, 32)] = True
    with torch.no_grad():
        torch.testing.assert_close(kernels.linear(x, W, b), F.linear(x, W, b), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(kernels.linear_add(y, x, W), y + x @ W.T, atol=1e-5, rtol=1e-5)
        assert kernels.linear(x.double(), W.double()).dtype == torch.float64  # other dtypes: PyTorch's kernel
    Wg = W.clone().requires_grad_()
    out = kernels.linear(x, Wg)  # under autograd: PyTorch's differentiable kernel, gradients flow
    out.sum().backward()
    torch.testing.assert_close(Wg.grad, x.sum(0).expand(48, 32))


def test_tune_times_every_shape_and_keeps_the_output_layer_tied(table, monkeypatch):
    lm = tiny_lm()
    lm.config.tie_word_embeddings = True
    lm.tie_weights()
    keys = set(lm.state_dict())
    monkeypatch.setenv("BORAHUB_ONEDNN", "1")
    chosen = kernels.tune(lm)
    shapes = {tuple(m.weight.shape) for m in lm.modules() if isinstance(m, torch.nn.Linear)}
    assert set(chosen) == shapes and all(chosen.values())
    head = lm.get_output_embeddings()
    assert isinstance(head, kernels.KernelLinear)
    assert head.weight is lm.get_input_embeddings().weight  # still tied
    assert set(lm.state_dict()) == keys
    ids = torch.randint(4, 128, (2, 7))
    with torch.no_grad():
        logits = lm(ids).logits
    table.clear()  # the same model through PyTorch's kernels
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, logits, atol=1e-4, rtol=1e-4)


def test_tune_by_timing_and_opt_out(table, monkeypatch):
    lm = tiny_lm()
    monkeypatch.setenv("BORAHUB_ONEDNN", "0")
    assert kernels.tune(lm) == {}
    monkeypatch.delenv("BORAHUB_ONEDNN")
    chosen = kernels.tune(lm, reps=2)
    assert set(chosen) == {tuple(m.weight.shape) for m in lm.modules() if isinstance(m, torch.nn.Linear)}
    head = lm.get_output_embeddings()
    assert isinstance(head, kernels.KernelLinear) == chosen[tuple(head.weight.shape)]


def test_stacked_layers_give_the_same_generation_with_either_kernel(table, monkeypatch, tiny_hub):
    """A routed decode through StackedLinear (its accumulate-into path included) with oneDNN everywhere equals the
    one with PyTorch's kernels."""
    from hub.engine import Engine

    monkeypatch.setenv("BORAHUB_ONEDNN", "0")
    engine = Engine.from_workspace(tiny_hub)
    prompts = ["stir the soup add salt", "the bank raised rates"]
    before = [r.text for r in engine.generate(prompts, task=["cooking", "finance"], max_new_tokens=6)]
    monkeypatch.setenv("BORAHUB_ONEDNN", "1")
    kernels.tune(engine.mtm.lm)
    assert table and all(table.values())
    after = [r.text for r in engine.generate(prompts, task=["cooking", "finance"], max_new_tokens=6)]
    assert after == before
