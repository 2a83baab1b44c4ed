"""GMT: the per-slice top-|grad| mask over accumulated gradients, and the masked Adam that leaves masked
entries (parameters and moments) untouched."""
from __future__ import annotations

import torch
from conftest import tiny_batcher, tiny_lm, tiny_tokenizer

from models.bora import BoraPrior, site_of
from models.gmt import GradientMask, MaskedAdam, keep_count
from models.multitask import MultiTaskModel
from models.trainer import Trainer
from tasks.schema import AdapterSpec

SPEC = AdapterSpec(type="moslora", rank=4, alpha=8, target_modules=["q_proj", "down_proj"])


def trainer(keep: list[float | None], tau=10.0, record: list | None = None, **kw) -> tuple[Trainer, GradientMask]:
    """A Trainer over a tiny model whose tasks use GMT with ``keep`` ratios; ``record`` gets raw grads."""
    mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [(f"t{i}", SPEC) for i in range(len(keep))])
    mask = GradientMask(mtm, keep, tau, freeze=[True] * len(keep))
    prior = BoraPrior(mtm, tau, torch.full((len(keep),), 6.0), mtm.init_params(0), centred=set(mask.groups))

    def capture(named_params):
        record.append({site_of(n): p.grad.clone() for n, p in named_params})

    hooks = ([capture] if record is not None else []) + [mask]
    t = Trainer(prior, tiny_batcher(len(keep)), lr=0.01, seed=0, grad_accum=2, grad_hooks=hooks,
                optimizer_factory=lambda ps: mask.optimizer(ps, 0.01), **kw)
    return t, mask


def test_mask_keeps_the_top_fraction_per_slice_and_adam_leaves_the_rest_untouched():
    raw: list[dict] = []
    t, _ = trainer([0.25, None], record=raw, steps=2)
    t.train_step()
    before = {site_of(n): p.detach().clone() for n, p in t.named_params}
    moments = {site_of(n): {k: v.clone() for k, v in t.optimizer.state[p].items()} for n, p in t.named_params}
    t.train_step()
    params = {site_of(n): p for n, p in t.named_params}
    theta, grad, raw_grad = params["theta_0"], params["theta_0"].grad, raw[-1]["theta_0"]
    g = t.prior.mtm.groups[0]
    for _, _, s in g.slices():
        cols = slice(s.offset, s.offset + s.numel)
        kept = grad[0, cols] != 0
        assert int(kept.sum()) == keep_count(s.numel, 0.25)  # exactly the requested share survives
        assert raw_grad[0, cols][kept].abs().min() >= raw_grad[0, cols][~kept].abs().max()  # the largest |grad|
        assert torch.equal(theta[0, cols][~kept], before["theta_0"][0, cols][~kept])  # masked: not moved
        assert (theta[0, cols][kept] != before["theta_0"][0, cols][kept]).all()
        for key in ("exp_avg", "exp_avg_sq", "step"):  # masked: moments and step count untouched
            state = t.optimizer.state[theta][key]
            assert torch.equal(state[0, cols][~kept], moments["theta_0"][key][0, cols][~kept])
    assert torch.equal(grad[1], raw_grad[1]) and (theta[1] != before["theta_0"][1]).float().mean() > 0.99
    assert (params["Theta_0"] != before["Theta_0"]).float().mean() > 0.99  # Theta: only the prior's pull, unmasked


def test_shared_tau_masks_theta_with_the_groups_largest_ratio():
    t, mask = trainer([0.1, 0.5], tau="shared", steps=2)
    t.train_step()  # Theta starts with B = 0 exactly, so A has no gradient until B has moved
    t.train_step()
    ((name, Theta),) = t.named_params
    g = t.prior.mtm.groups[0]
    for _, _, s in g.slices():
        assert int(Theta.grad[s.offset: s.offset + s.numel].ne(0).sum()) == keep_count(s.numel, 0.5)
    assert mask.masks[Theta].shape == Theta.shape


def test_masked_adam_without_masks_matches_torch_adam():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=gen).requires_grad_()
    b = a.detach().clone().requires_grad_()
    ours, ref = MaskedAdam([a], {}, lr=0.05), torch.optim.Adam([b], lr=0.05)
    for _ in range(4):
        grad = torch.randn(5, 7, generator=gen)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step(), ref.step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"])


def test_gmt_run_resumes_to_the_same_adapters(tmp_path):
    """The masked Adam's per-entry state goes through the trainer's checkpoint: kill + resume == straight run."""
    straight, _ = trainer([0.25, None], steps=3)
    straight.fit(progress=False)
    first, _ = trainer([0.25, None], steps=3, checkpoint_every=2, checkpoint_dir=tmp_path)
    first.steps = 2  # "killed" after the checkpoint at step 2
    first.fit(progress=False)
    resumed, _ = trainer([0.25, None], steps=3, checkpoint_every=2, checkpoint_dir=tmp_path)
    resumed.fit(resume=True, progress=False)
    assert resumed.step == 3
    for (_, p), (_, q) in zip(straight.named_params, resumed.named_params, strict=True):
        assert torch.equal(p, q)


def test_by_default_masked_entries_move_on_adams_momentum():
    from models.regularisers import training_extras
    from tasks.schema import GMTSpec, TaskSpec

    mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("t0", SPEC), ("t1", SPEC)])
    tasks = [TaskSpec(name="t0", gmt=GMTSpec(keep_ratio=0.25)), TaskSpec(name="t1")]
    extras = training_extras(mtm, tasks, 10.0, 0.01)
    assert extras.optimizer_factory is None  # the trainer's plain Adam
    frozen = training_extras(mtm, [TaskSpec(name="t0", gmt=GMTSpec(keep_ratio=0.25, freeze_masked=True)),
                                   TaskSpec(name="t1")], 10.0, 0.01)
    assert frozen.optimizer_factory is not None
    (mask,) = extras.grad_hooks
    assert extras.centred_groups == set() and frozen.centred_groups == {0}  # non-centred unless entries freeze
    prior = BoraPrior(mtm, 10.0, torch.full((2,), 6.0), mtm.init_params(0), centred=extras.centred_groups)
    t = Trainer(prior, tiny_batcher(2), lr=0.01, seed=0, grad_accum=2, steps=4, grad_hooks=[mask])
    params = {site_of(n): p for n, p in t.named_params}
    assert "theta_0" not in params  # non-centred: GMT masks the task's offset delta_t
    delta, ever_kept = params["delta_0"], torch.zeros_like(params["delta_0"][0], dtype=torch.bool)
    for _ in range(3):
        t.train_step()
        ever_kept |= delta.grad[0] != 0
    before = delta.detach().clone()
    t.train_step()
    masked = delta.grad[0] == 0
    assert (params["Theta_0"].grad != 0).float().mean() > 0.9  # Theta, trained by every task's data: whole
    assert 0.6 < masked.float().mean() < 0.8  # the gradient is masked as before ...
    carried = masked & ever_kept  # ... and entries with momentum from earlier steps still move on it
    assert carried.sum() > 10 and (delta[0][carried] != before[0][carried]).all()
    never = masked & ~ever_kept  # entries that never had a gradient have no momentum
    assert torch.equal(delta[0][never], before[0][never])
