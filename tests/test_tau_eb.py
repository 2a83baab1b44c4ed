"""tau: auto learns tau in one run (models/tau_eb.py): on Gaussian task parameters drawn with a known tau it
recovers that tau; its state survives a checkpoint; a registry with tau: auto trains once and records tau."""
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

TOLERANCE = 1.3  # the learned tau is within a factor 1.3 of the tau the task parameters were drawn with


def learn_tau(tau_true: float, T: int = 10, D: int = 400, steps: int = 600, batch: int = 4, seed: int = 0) -> float:
    """theta_t ~ N(Theta, 1/tau_true) in D dimensions, n_t observations y ~ N(theta_t, I) per task (4 to 96):
    MAP over (delta, Theta) with Adam on minibatches scaled to each task's size, as BoraPrior's loss is, with the
    evidence hook learning tau from tau0 = 1."""
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor([4, 6, 8, 12, 16, 24, 32, 48, 64, 96][:T])
    theta_true = torch.randn(D, generator=g) + torch.randn(T, D, generator=g) / math.sqrt(tau_true)
    data = [theta_true[t] + torch.randn(int(n[t]), D, generator=g) for t in range(T)]
    delta, Theta = torch.nn.Parameter(torch.zeros(T, D)), torch.nn.Parameter(torch.zeros(D))
    group = types.SimpleNamespace(task_ids=list(range(T)))
    prior = types.SimpleNamespace(tau=1.0, mtm=types.SimpleNamespace(groups=[group]))
    hook = EvidenceTau(prior, torch.full((T,), float(batch)), n.float(), steps, tau0=1.0)
    opt = torch.optim.Adam([delta, Theta], lr=0.05)
    for s in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * s / steps))
        opt.zero_grad()
        theta = Theta + delta
        loss = 0.5 * prior.tau * delta.pow(2).sum()
        for t in range(T):
            rows = data[t][torch.randint(int(n[t]), (batch,), generator=g)]
            loss = loss + (n[t] / batch) * (0.5 * (theta[t] - rows).pow(2).sum(1)).sum()
        loss.backward()
        hook([("locs.delta_0_unconstrained", delta), ("locs.Theta_0_unconstrained", Theta)])
        opt.step()
    return prior.tau


@pytest.mark.parametrize("tau_true", [0.5, 4.0, 30.0])
def test_the_evidence_update_recovers_the_tau_the_tasks_were_drawn_with(tau_true):
    learned = learn_tau(tau_true)
    assert tau_true / TOLERANCE < learned < tau_true * TOLERANCE, learned


def test_a_checkpoint_keeps_the_learned_tau_and_its_curvature(tmp_path):
    from models.bora import BoraPrior
    from models.multitask import MultiTaskModel
    from models.trainer import Trainer
    from tasks.schema import AdapterSpec

    def trainer():
        spec = AdapterSpec(rank=4, alpha=8, target_modules=["q_proj"])
        mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("a", spec), ("b", spec)])
        prior = BoraPrior(mtm, 1.0, torch.full((2,), 6.0), mtm.init_params(0))
        hook = EvidenceTau(prior, torch.full((2,), 2.0), torch.full((2,), 6.0), steps=8, warmup=0.25, every=1)
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
    assert state["metrics"]["run"]["steps_run"] == 12  # one run of the budget, not a search
    assert main(["--config", str(tiny_registry), "train", "--quiet", "--tasks", "sport"]) == 2
    assert "tau 'auto' learns tau from every task's offsets" in capsys.readouterr().err
