"""tau: auto learns tau in one run (models/tau_eb.py, models/tau_heldout.py): on Gaussian task parameters drawn
with a known tau it recovers that tau, and in a run too short for the offsets to reach their MAP the held-out
correction lands near the best fixed tau; its state survives a checkpoint; a registry with tau: auto trains once
and records tau and the method."""
from __future__ import annotations

import json
import math
import types

import pytest
import torch
import yaml
from conftest import tiny_batcher, tiny_lm, tiny_tokenizer

from hub.cli import main
from models.tau_eb import EvidenceTau
from models.tau_heldout import HeldOutTau, best_shrinkage

TOLERANCE = 1.3  # the learned tau is within a factor 1.3 of the tau the task parameters were drawn with
SIZES = [4, 6, 8, 12, 16, 24, 32, 48, 64, 96]


def gaussian_tasks(tau_true: float, seed: int = 0, D: int = 400, n_val: int = 50):
    """theta_t ~ N(Theta, 1/tau_true) in D dimensions; n_t training and n_val validation observations
    y ~ N(theta_t, I) per task."""
    g = torch.Generator().manual_seed(seed)
    T = len(SIZES)
    theta_true = torch.randn(D, generator=g) + torch.randn(T, D, generator=g) / math.sqrt(tau_true)
    train = [theta_true[t] + torch.randn(n, D, generator=g) for t, n in enumerate(SIZES)]
    val = [theta_true[t] + torch.randn(n_val, D, generator=g) for t in range(T)]
    return train, val, g


def held_out_loss(theta: torch.Tensor, val: list[torch.Tensor]) -> float:
    """The mean over tasks of each task's mean validation NLL (up to a constant)."""
    return float(sum(0.5 * (theta[t] - v).pow(2).sum(1).mean() for t, v in enumerate(val)) / len(val))


def fit_tasks(tau_true: float, tau, steps: int = 600, batch: int = 4, lr: float = 0.05, seed: int = 0):
    """MAP over (delta, Theta) with Adam (cosine rate) on minibatches scaled to each task's size, as BoraPrior's
    loss is. tau: a number (fixed), "evidence" (EvidenceTau from tau0 = 1) or "held-out" (HeldOutTau).
    Returns (final tau, held-out loss)."""
    train, val, g = gaussian_tasks(tau_true, seed)
    T, D = len(train), train[0].shape[1]
    n = torch.tensor(SIZES)
    delta, Theta = torch.nn.Parameter(torch.zeros(T, D)), torch.nn.Parameter(torch.zeros(D))
    group = types.SimpleNamespace(task_ids=list(range(T)))
    prior = types.SimpleNamespace(tau=tau if isinstance(tau, float) else 1.0,
                                  mtm=types.SimpleNamespace(groups=[group]))
    hook = None
    if tau == "evidence":
        hook = EvidenceTau(prior, torch.full((T,), float(batch)), n.float(), steps, tau0=1.0)
    elif tau == "held-out":
        hook = HeldOutTau(prior, lambda alphas, step: tuple(held_out_loss((Theta + a * delta).detach(), val)
                                                            for a in alphas), steps)
    opt = torch.optim.Adam([delta, Theta], lr=lr)
    for s in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = lr * 0.5 * (1 + math.cos(math.pi * s / steps))
        opt.zero_grad()
        theta = Theta + delta
        loss = 0.5 * prior.tau * delta.pow(2).sum()
        for t in range(T):
            rows = train[t][torch.randint(int(n[t]), (batch,), generator=g)]
            loss = loss + (n[t] / batch) * (0.5 * (theta[t] - rows).pow(2).sum(1)).sum()
        loss.backward()
        if hook:
            hook([("locs.delta_0_unconstrained", delta), ("locs.Theta_0_unconstrained", Theta)])
        opt.step()
    return prior.tau, held_out_loss((Theta + delta).detach(), val)


@pytest.mark.parametrize("method", ["evidence", "held-out"])
@pytest.mark.parametrize("tau_true", [0.5, 4.0, 30.0])
def test_tau_auto_recovers_the_tau_the_tasks_were_drawn_with(tau_true, method):
    learned, _ = fit_tasks(tau_true, method)
    assert tau_true / TOLERANCE < learned < tau_true * TOLERANCE, learned


def test_the_shrinkage_loss_is_the_mean_of_each_tasks_held_out_nll_along_the_ray():
    """alpha = 1: the trained adapters' per-task mean token NLL on the validation rows, averaged over tasks (one
    forward per task gives what a mixed forward gives); alpha = 0: every task at Theta."""
    from models.bora import BoraPrior
    from models.multitask import MultiTaskModel
    from models.tau_heldout import shrinkage_loss
    from tasks.schema import AdapterSpec

    spec = AdapterSpec(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("a", spec), ("b", spec)])
    init = {k: (theta + 0.05 * torch.randn_like(theta), Theta + 0.05 * torch.randn_like(Theta))
            for k, (theta, Theta) in mtm.init_params(0).items()}  # B away from zero: the tasks differ
    prior = BoraPrior(mtm, 1.0, torch.full((2,), 6.0), init)
    batcher = tiny_batcher(2)
    prior.loss(batcher.batch(0))  # materialise the guide, as the Trainer does
    loss = shrinkage_loss(prior, batcher)

    def expected(alpha):
        mtm.set_params({k: (Theta + alpha * (theta - Theta), Theta) for k, (theta, Theta) in prior.values().items()})
        batch = batcher.batch(3)
        with torch.no_grad():
            nll, ntok = mtm.row_nll(batch)
        t = batch["task_ids"]
        return sum(float(nll[t == u].sum() / ntok[t == u].sum()) for u in t.unique()) / len(t.unique())

    at_one, at_zero = loss((1.0, 0.0), 3)
    assert at_one == pytest.approx(expected(1.0), rel=1e-5) and at_zero == pytest.approx(expected(0.0), rel=1e-5)
    assert abs(at_one - at_zero) > 1e-4  # the offsets matter, so the test would see a wrong alpha


def test_the_shrinkage_vertex_is_exact_for_a_quadratic_and_bounded_otherwise():
    r = 1.5
    for alpha_star in (0.8, 1.0, 1.3):
        losses = tuple(3.0 * (a - alpha_star) ** 2 + 7.0 for a in (1 / r, 1.0, r))
        assert best_shrinkage(losses, r) == pytest.approx(math.log(alpha_star))
    far = tuple(3.0 * (a - 0.3) ** 2 for a in (1 / r, 1.0, r))
    assert best_shrinkage(far, r) == pytest.approx(-2 * math.log(r))  # alpha* = 0.3 is beyond reach: clipped
    falling = tuple(-(a * a) for a in (1 / r, 1.0, r))
    assert best_shrinkage(falling, r) == pytest.approx(2 * math.log(r))  # opens downwards: towards the lower side
    assert best_shrinkage((1.0, 2.0, 1.5), r) == pytest.approx(-2 * math.log(r))


@pytest.mark.parametrize("method", ["evidence", "held-out"])
def test_a_checkpoint_keeps_the_learned_tau_and_its_state(tmp_path, method):
    from models.bora import BoraPrior
    from models.multitask import MultiTaskModel
    from models.tau_heldout import shrinkage_loss
    from models.trainer import Trainer
    from tasks.schema import AdapterSpec

    def trainer():
        spec = AdapterSpec(rank=4, alpha=8, target_modules=["q_proj"])
        mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("a", spec), ("b", spec)])
        prior = BoraPrior(mtm, 1.0, torch.full((2,), 6.0), mtm.init_params(0))
        if method == "evidence":
            hook = EvidenceTau(prior, torch.full((2,), 2.0), torch.full((2,), 6.0), steps=8, warmup=0.25, every=1)
        else:  # the tiny tasks themselves as validation rows (enough for a checkpoint)
            hook = HeldOutTau(prior, shrinkage_loss(prior, tiny_batcher(2)), steps=8, warmup=0.25, every=1)
        return Trainer(prior, tiny_batcher(2), steps=8, lr=0.01, seed=0, checkpoint_dir=tmp_path,
                       grad_hooks=[hook]), hook

    straight, h1 = trainer()
    for _ in range(8):
        straight.train_step()
    first, _ = trainer()
    for _ in range(5):
        first.train_step()
    first.save_checkpoint()
    resumed, h2 = trainer()
    assert resumed.load_checkpoint() and h2.step == 5 and h2.prior.tau == h2.history[-1][1] != 1.0
    for _ in range(3):
        resumed.train_step()
    assert [s for s, _ in h2.history] == [s for s, _ in h1.history]
    assert [t for _, t in h2.history] == pytest.approx([t for _, t in h1.history], rel=1e-5)
    assert h2.prior.tau == pytest.approx(h1.prior.tau, rel=1e-5)


def test_tau_auto_trains_once_and_records_the_learned_tau(tiny_registry, capsys):
    cfg = yaml.safe_load(tiny_registry.read_text())
    cfg["prior"]["tau"] = "auto"
    cfg["training"]["steps"] = 12
    tiny_registry.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tiny_registry), "train", "--quiet"]) == 0
    state = json.loads((tiny_registry.parent / "store" / "hub.json").read_text())
    learned = state["metrics"]["tau_auto"]
    assert isinstance(state["tau"], float) and state["tau"] == learned["tau"] != 1.0
    assert learned["history"][0] == [0, 1.0] and learned["history"][-1][1] == state["tau"]
    assert "held-out" in learned["method"]  # the tiny tasks have validation rows: the held-out correction ran
    assert "prior-scale units" in learned["method"]  # delta = u / sqrt(tau) while tau moves (models/bora.py)
    assert len(learned["history"]) >= 3  # tau0, then a held-out correction every 4 steps after the first
    assert state["metrics"]["run"]["steps_run"] == 12  # one run of the budget, not a search
    assert main(["--config", str(tiny_registry), "train", "--quiet", "--tasks", "sport"]) == 2
    assert "tau 'auto' learns tau from every task's offsets" in capsys.readouterr().err
