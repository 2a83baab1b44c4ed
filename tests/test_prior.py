"""The BoRA prior: tau=0 decouples tasks, a huge tau ties every task to Theta, tau=shared is one adapter."""
from __future__ import annotations

import math

import torch
from conftest import tiny_lm

from models.base import prepare
from models.bora import BoraPrior
from models.multitask import MultiTaskModel
from tasks.schema import AdapterSpec

SPEC = AdapterSpec(rank=2, alpha=4, target_modules=["q_proj", "v_proj"])


def setup(tau, seed=0):
    lm = tiny_lm()
    prepare(lm, None)
    mtm = MultiTaskModel(lm, None, "tiny", [(n, SPEC) for n in ("a", "b", "c")])
    init = mtm.init_params(seed, noise=1e-2)
    return mtm, BoraPrior(mtm, tau, torch.tensor([10.0, 20.0, 30.0]), init)


def only_task0_batch():
    ids = torch.randint(4, 128, (4, 6), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "task_ids": torch.zeros(4, dtype=torch.long)}


def grads(prior, batch):
    loss = prior.loss(batch)
    params = dict(prior.guide.named_parameters())
    for p in params.values():
        p.grad = None
    loss.backward()
    return {k.split(".")[-1]: p.grad for k, p in params.items()}


def test_tau_zero_leaves_tasks_uncoupled():
    _, prior = setup(0.0)
    g = grads(prior, only_task0_batch())
    theta = g["theta_0_unconstrained"]
    assert theta[0].abs().sum() > 0  # the task with data learns
    assert torch.equal(theta[1:], torch.zeros_like(theta[1:]))  # the others get exactly no gradient
    assert g["Theta_0_unconstrained"] is None or torch.equal(g["Theta_0_unconstrained"],
                                                              torch.zeros_like(g["Theta_0_unconstrained"]))


def test_positive_tau_couples_tasks_through_theta():
    _, prior = setup(100.0)
    g = grads(prior, only_task0_batch())
    delta = g["delta_0_unconstrained"]  # non-centred: theta_t = Theta + delta_t
    assert delta[1:].abs().sum() > 0  # the prior pulls the data-less tasks towards Theta
    values = prior.values()[prior.mtm.groups[0].key]
    expected = 100.0 * (values[0][1:] - values[1])  # d/dtheta of tau/2 ||theta - Theta||^2
    assert torch.allclose(delta[1:], expected, rtol=1e-4, atol=1e-6)
    # Theta gets the data gradient of task 0 (what a shared adapter would get); the prior's pull on Theta
    # cancels in this parameterisation
    assert g["Theta_0_unconstrained"].abs().sum() > 0
    torch.testing.assert_close(g["Theta_0_unconstrained"], delta[0] - 100.0 * (values[0][0] - values[1]),
                               rtol=1e-4, atol=1e-6)


def spread_after_training(tau, steps=60, lr=1e-5):
    """max_t ||theta_t - Theta|| after plain gradient descent on the MAP objective
    (lr well below 1/((T+1) tau), so the stiff prior converges instead of oscillating as under Adam)."""
    mtm, prior = setup(tau)
    prior.loss(only_task0_batch())  # the guide creates its parameters on first use
    opt = torch.optim.SGD(prior.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(4, 128, (6, 6), generator=gen)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             "task_ids": torch.tensor([0, 1, 2, 0, 1, 2])}
        opt.zero_grad()
        prior.loss(b).backward()
        opt.step()
    theta, Theta = prior.values()[mtm.groups[0].key]
    return (theta - Theta).norm(dim=1).max().item()


def test_large_tau_pulls_every_task_to_theta():
    free, tied = spread_after_training(0.0), spread_after_training(1e4)
    assert free > 0.1  # the tasks' initial spread (noise 1e-2 per coordinate) is kept without a prior
    assert tied < 1e-2 * free


def test_shared_tau_is_one_adapter():
    mtm, prior = setup("shared")
    prior.loss(only_task0_batch())
    theta, Theta = prior.values()[mtm.groups[0].key]
    assert torch.equal(theta, Theta.expand_as(theta))
    assert [n.split(".")[-1] for n, _ in prior.guide.named_parameters()] == ["Theta_0_unconstrained"]


def test_isotropic_normal_is_the_papers_normal_prior():
    """The fused prior density equals Normal(Theta, tau^-1/2).to_event(1), value and gradient, inside a plate."""
    import pyro.distributions as dist

    from models.bora import IsotropicNormal

    gen = torch.Generator().manual_seed(0)
    Theta = torch.randn(50, generator=gen, requires_grad=True)
    theta = torch.randn(3, 50, generator=gen, requires_grad=True)
    tau = 37.0
    ours = IsotropicNormal(Theta, tau, (3,)).log_prob(theta)
    ref = dist.Normal(Theta, tau ** -0.5).to_event(1).log_prob(theta)
    torch.testing.assert_close(ours, ref)
    g1 = torch.autograd.grad(ours.sum(), [theta, Theta])
    g2 = torch.autograd.grad(ref.sum(), [theta, Theta])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert IsotropicNormal(Theta, tau, (3,)).sample().shape == (3, 50)


def test_loss_is_the_negative_log_joint():
    """prior.loss = -(scaled LM log likelihood + sum_t log N(theta_t | Theta, 1/tau)) at the current point."""
    import pyro.distributions as dist

    mtm, prior = setup(5.0)
    batch = only_task0_batch()
    loss = prior.loss(batch)
    (g,) = mtm.groups
    (theta, Theta) = prior.values()[g.key]
    g.flat = torch.cat([theta, Theta[None]])
    nll, ntok = mtm.row_nll(batch)
    lm = (10.0 / 4 * nll / ntok).sum()  # task 0 has 10 documents and all 4 rows
    log_prior = dist.Normal(Theta, 5.0 ** -0.5).to_event(1).log_prob(theta).sum()
    torch.testing.assert_close(loss.detach(), (lm - log_prior).detach(), rtol=1e-5, atol=1e-3)


def test_scaled_offsets_are_the_same_model_and_a_new_tau_rescales_them_at_once():
    """scaled (tau: auto): delta_t = u_t / sqrt(tau), u_t ~ N(0, I). At a fixed tau it is the same density as the
    non-centred form up to a constant (the log-normaliser), from the same (theta, Theta); the gradient on u_t is
    delta_t's divided by sqrt(tau); and when tau changes the offsets shrink or grow at once by sqrt(old / new)."""
    tau = 9.0
    mtm, plain = setup(tau)
    init = mtm.init_params(0, noise=1e-2)
    scaled = BoraPrior(mtm, tau, torch.tensor([10.0, 20.0, 30.0]), init, scaled=True)
    assert scaled.task_site(0) == "u_0" and plain.task_site(0) == "delta_0"
    key, batch, dim = mtm.groups[0].key, only_task0_batch(), mtm.groups[0].dim
    constant = 3 * 0.5 * dim * math.log(tau)  # the 3 tasks' normalisers: D/2 log(tau) in one, 0 in the other
    torch.testing.assert_close(float((plain.loss(batch) - scaled.loss(batch)).detach()), -constant, rtol=1e-5,
                               atol=1e-2)
    for a, b in zip(plain.values()[key], scaled.values()[key]):
        torch.testing.assert_close(a, b)
    g_plain, g_scaled = grads(plain, batch), grads(scaled, batch)
    torch.testing.assert_close(g_scaled["u_0_unconstrained"], g_plain["delta_0_unconstrained"] / 3.0,
                               rtol=1e-4, atol=1e-7)
    theta, Theta = scaled.values()[key]
    scaled.tau = 4 * tau
    theta2, Theta2 = scaled.values()[key]
    torch.testing.assert_close(theta2 - Theta2, (theta - Theta) / 2)  # sqrt(tau / (4 tau))
