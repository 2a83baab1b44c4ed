"""tau in one training run, judged on held-out data: a shrinkage test on the validation split moves tau.

What tau controls first is how far each task moves from Theta, and that can be measured directly, with
forwards only: the held-out NLL of theta_t(alpha) = Theta + alpha * delta_t for alpha around 1. If a little
shrinkage (alpha < 1) lowers it, the offsets are too long for held-out data and tau goes up; if longer offsets
would do better, tau goes down. In the prior-dominated regime the offsets scale as 1 / tau, so the best
shrinkage alpha* asks for tau / alpha*; the update takes a ``damping`` share of that step in log space:

    log tau <- log tau - damping * log alpha*,   alpha* from the parabola in alpha through alpha = 1/r, 1, r

(three forwards of a validation batch, no backward), every ``every`` steps from ``warmup`` to ``stop`` of the
run (later, the decayed learning rate leaves the offsets where they are). The held-out loss is the mean over
tasks of each task's mean token NLL, as the per-task perplexity that tau is judged by.

Why not the evidence fixed point (models/tau_eb.py, kept for hubs without validation rows): it assumes the
offsets sit at their MAP, and after a budget of a few hundred steps they do not. On HWU64 it landed at tau
24-45 where the best fixed tau was 10 (+6.3% mean perplexity), and starting the held-out test from the evidence
point (147 after the warm-up at tau0 = 1) was worse still (+11.5% on seed 0): the early steps at a too-large tau
cost what later corrections cannot win back.

While tau moves, the prior (models/bora.py, ``scaled``) writes the offsets in units of its own scale, delta_t =
u_t / sqrt(tau): a new tau then shortens or lengthens the offsets at once, which is what the test asked for, and
the prior's gradient on u_t (u_t itself) does not jump with tau. With delta_t itself trained, a tau that rose
30-fold multiplied the prior's gradient on every offset while Adam's second moments, averaged over the whole
run, still reflected the early, small ones; tau kept climbing (to 43-79 on BBC topics, where fixed tau 7-100 all
scored within 2%) and the runs ended worse than any fixed tau they passed through. Measured (docs/bora.md):
BBC +2.0% -> +0.7% against the best grid tau on the 3-seed mean.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor



def best_shrinkage(losses: tuple[float, float, float], ratio: float, reach: float = 2.0) -> float:
    """log alpha* from the held-out losses at alpha = 1/ratio, 1, ratio: the vertex of the parabola in alpha
    through them (a Gaussian likelihood is exactly quadratic in alpha) when it opens upwards, else the lower
    side; alpha* within ratio^(+-reach) (no far extrapolation)."""
    xs = (1 / ratio, 1.0, ratio)
    a, b, _ = torch.linalg.solve(torch.tensor([[x * x, x, 1.0] for x in xs], dtype=torch.float64),
                                 torch.tensor(losses, dtype=torch.float64)).tolist()
    bound = reach * math.log(ratio)
    if a <= 0:
        return bound if losses[2] < losses[0] else -bound
    vertex = -b / (2 * a)
    return max(-bound, min(bound, math.log(vertex))) if vertex > 0 else -bound


class HeldOutTau:
    """A Trainer grad hook that moves the BoraPrior's tau by the held-out shrinkage test (module docstring).

    heldout_losses(alphas, step): the held-out loss at each alpha with every task at Theta + alpha * delta_t, on
    the validation rows of ``step`` (a pure function of the step, so a resumed run sees the same rows).
    ``history`` keeps (step, tau) for the store's metrics.
    """

    def __init__(self, prior, heldout_losses: Callable[[tuple, int], tuple], steps: int, tau0: float = 1.0,
                 warmup: float = 0.1, stop: float = 0.8, every: int = 4, ratio: float = 1.5, damping: float = 1.0,
                 bounds: tuple[float, float] = (1e-2, 1e4)):
        self.prior, self.heldout_losses = prior, heldout_losses
        self.first = max(1, int(warmup * steps))
        self.last = max(self.first, int(stop * steps))
        self.every, self.ratio, self.damping, self.bounds = every, ratio, damping, bounds
        self.prior.tau = float(tau0)
        self.step = 0
        self.history: list[list] = [[0, float(tau0)]]  # [step, tau] (JSON-shaped)

    def state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint keeps so that a resumed run continues tau where it was."""
        return {"step": torch.tensor(self.step), "history": torch.tensor(self.history, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.step = int(state["step"])
        self.history = [[int(s), float(t)] for s, t in state["history"].tolist()]
        self.prior.tau = self.history[-1][1]

    def __call__(self, named_params) -> None:
        self.step += 1
        if not (self.first <= self.step <= self.last and (self.step - self.first) % self.every == 0):
            return
        losses = self.heldout_losses((1 / self.ratio, 1.0, self.ratio), self.step)
        if not all(math.isfinite(x) for x in losses):
            return
        lo, hi = self.bounds
        log_tau = math.log(self.prior.tau) - self.damping * best_shrinkage(losses, self.ratio)
        self.prior.tau = min(max(math.exp(log_tau), lo), hi)
        self.history.append([self.step, self.prior.tau])


def shrinkage_loss(prior, batcher) -> Callable[[tuple, int], tuple]:
    """The held-out losses for HeldOutTau on a BoraPrior: ``batcher`` draws validation rows (balanced over tasks);
    the model runs in eval mode without gradients at theta_t = Theta + alpha * (theta_t - Theta), one routed
    forward over every task's rows as a training step runs (0.78x the time of one forward per task, measured on
    the BBC sweep's 5 tasks), and the next training step puts the trained values back (the prior's model sets them
    on every forward)."""
    mtm = prior.mtm

    def task_means(batch: dict) -> list[float]:
        with torch.no_grad():
            nll, ntok = mtm.row_nll({k: v.to(mtm.device) for k, v in batch.items()})
        t = batch["task_ids"].to(nll.device)
        return [float(nll[t == u].sum() / ntok[t == u].sum().clamp(min=1)) for u in t.unique()]

    def loss_at(alpha: float, batch: dict, values: dict) -> float:
        mtm.set_params({k: (Theta + alpha * (theta - Theta), Theta) for k, (theta, Theta) in values.items()})
        per_task = task_means(batch)
        return sum(per_task) / len(per_task)

    def loss(alphas: tuple, step: int) -> tuple:
        batch, values = batcher.batch(step), prior.values()  # once per probe, shared by its alphas
        was = mtm.training
        mtm.eval()
        try:
            return tuple(loss_at(a, batch, values) for a in alphas)
        finally:
            mtm.train(was)

    return loss
