"""HiddenKey on a tiny random Llama: column DropKey, HiddenCut, bidirectional KL, and stock behaviour when off."""
import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from models.hiddenkey import HiddenKey, bidirectional_kl

N, L = 3, 12


@pytest.fixture
def models():
    """(stock sdpa model, identical copy with HiddenKey installed, its HiddenKey)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256, pad_token_id=0)
    stock = LlamaForCausalLM(config)
    model = copy.deepcopy(stock)
    return stock, model, HiddenKey(model)


def batch(left_pad: bool = True):
    ids = torch.randint(1, 256, (N, L), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if left_pad:
        ids[1, :4], mask[1, :4] = 0, 0
        ids[2, :1], mask[2, :1] = 0, 0
    return ids, mask


def rates(*values):
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("left_pad", [False, True])
def test_key_mask_is_column_structured_and_never_drops_every_key(models, left_pad):
    _, model, hk = models
    ids, mask = batch(left_pad)
    model.train()
    hk.set_rows(rates(0.99, 0.99, 0.5), rates(0, 0, 0))
    out = model(ids, attention_mask=mask, output_attentions=True)
    assert torch.isfinite(out.logits).all()
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    real = mask.bool()
    for dropped, weights in zip(hk.last_key_masks, out.attentions, strict=True):
        assert dropped.shape == (N, 4, L) and dropped.float().mean() > 0.5
        # every query that could see a dropped key gives it exactly zero weight (same columns for all queries)
        could_see = causal & real[:, None, None, :]  # (N, 1, Q, K)
        assert (weights[dropped[:, :, None, :].expand_as(weights) & could_see] == 0).all()
        # the first real key survives, so every real query still attends to at least one key
        first = real.int().argmax(dim=1)
        assert not dropped[torch.arange(N), :, first].any()
        kept = ((weights > 0) & could_see).sum(dim=-1)  # (N, H, Q)
        assert (kept[real[:, None, :].expand_as(kept)] >= 1).all()


def test_eval_mode_matches_stock_sdpa_including_generate(models):
    stock, model, hk = models
    ids, mask = batch()
    hk.set_rows(rates(0.5, 0.5, 0.5), rates(0.5, 0.5, 0.5))
    stock.eval(), model.eval()
    with torch.no_grad():
        assert (model(ids, attention_mask=mask).logits - stock(ids, attention_mask=mask).logits).abs().max() < 1e-6
        assert not hk.last_key_masks and not hk.last_hidden_masks
        kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kwargs), stock.generate(ids, **kwargs))


def test_rows_with_rate_zero_are_untouched_in_training(models):
    stock, model, hk = models
    ids, mask = batch()
    stock.train(), model.train()
    hk.set_rows(rates(0, 0.3, 0.3), rates(0, 0.3, 0.3))
    perturbed, reference = model(ids, attention_mask=mask).logits, stock(ids, attention_mask=mask).logits
    assert torch.equal(perturbed[0], reference[0])
    assert (perturbed[1:] - reference[1:]).abs().amax(dim=(1, 2)).min() > 1e-3
    hk.clear()
    assert torch.equal(model(ids, attention_mask=mask).logits, reference)


def test_kl_is_zero_with_replayed_masks_and_positive_otherwise(models):
    _, model, hk = models
    ids, mask = batch()
    model.train()
    hk.set_rows(rates(0.2, 0.2, 0.2), rates(0.2, 0.2, 0.2))
    with hk.record():
        first = model(ids, attention_mask=mask).logits
    with hk.replay():
        same = model(ids, attention_mask=mask).logits
    fresh = model(ids, attention_mask=mask).logits
    assert bidirectional_kl(first, same, mask).abs().max() < 1e-7
    assert (bidirectional_kl(first, fresh, mask) > 1e-6).all()


def test_bidirectional_kl_is_the_masked_mean_of_both_directions():
    a, b = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    la, lb = a.log_softmax(-1), b.log_softmax(-1)
    per_token = F.kl_div(lb, la, log_target=True, reduction="none").sum(-1) \
        + F.kl_div(la, lb, log_target=True, reduction="none").sum(-1)
    expected = torch.stack([per_token[0, :3].mean(), per_token[1].mean()])
    torch.testing.assert_close(bidirectional_kl(a, b, mask), expected)


def test_hidden_cut_drops_the_expected_fraction_and_rescales(models):
    _, model, hk = models
    ids = torch.randint(1, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    mlp = model.model.layers[0].mlp
    seen = {}
    mlp.down_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("raw", out))
    mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("cut", out))  # runs after HiddenKey's hook
    model.train()
    hk.set_rows(rates(0, 0), rates(0, 0.3))
    model(ids)
    raw, cut, dropped = seen["raw"], seen["cut"], hk.last_hidden_masks[0]
    assert len(hk.last_hidden_masks) == 2 and not dropped[0].any()
    assert torch.equal(cut[0], raw[0])
    assert abs(dropped[1].float().mean().item() - 0.3) < 0.05
    assert (cut[1][dropped[1]] == 0).all()
    torch.testing.assert_close(cut[1][~dropped[1]], raw[1][~dropped[1]] / 0.7)


def test_hidden_cut_leaves_massive_activations_alone(models):
    _, model, hk = models
    ids = torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    mlp = model.model.layers[0].mlp
    seen = {}

    def plant(m, a, out):  # a massive activation on every token's channel 5, as decoders carry on a few tokens
        out = out.clone()
        out[..., 5] = 1e4 * out.abs().median()
        seen["raw"] = out
        return out

    mlp.down_proj.register_forward_hook(plant)
    mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("cut", out))
    model.train()
    hk.set_rows(rates(0, 0), rates(0.5, 0.5))
    model(ids)
    raw, cut, dropped = seen["raw"], seen["cut"], hk.last_hidden_masks[0]
    assert dropped[..., 5].any()  # drawn for dropping, yet kept exactly
    assert torch.equal(cut[..., 5], raw[..., 5])
    ordinary = torch.ones_like(dropped)
    ordinary[..., 5] = False
    assert (cut[dropped & ordinary] == 0).all()
    torch.testing.assert_close(cut[~dropped & ordinary], raw[~dropped & ordinary] / 0.5)


def test_gradients_flow_through_both_passes(models):
    _, model, hk = models
    ids, mask = batch()
    model.train()
    hk.set_rows(rates(0, 0.1, 0.2), rates(0, 0.1, 0.2))
    first, second = model(ids, attention_mask=mask, labels=ids), model(ids, attention_mask=mask)
    loss = first.loss + bidirectional_kl(first.logits, second.logits, mask).mean()
    loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_rates_are_validated(models):
    _, model, hk = models
    with pytest.raises(ValueError):
        hk.set_rows(rates(0.1, 1.0), rates(0, 0))
    hk.set_rows(rates(0.1, 0.1), rates(0, 0))
    model.train()
    with pytest.raises(ValueError):
        model(torch.ones(3, 4, dtype=torch.long))


def test_hidden_cut_defaults_to_the_models_own_pretraining_dropout():
    from transformers import GPT2Config

    from models.hiddenkey import pretrained_hidden_dropout
    from tasks.schema import HiddenKeySpec

    assert pretrained_hidden_dropout(LlamaConfig()) == 0.0  # LLaMA-style decoders train without hidden dropout
    assert pretrained_hidden_dropout(GPT2Config(resid_pdrop=0.1)) == 0.1
    spec = HiddenKeySpec()
    assert spec.hidden_drop is None and spec.key_drop == 0.05 and spec.kl_weight == 1.0
