"""tau in one training run, judged on held-out data: the evidence update sets tau's scale, a shrinkage test on the
validation split corrects it.

The evidence fixed point (models/tau_eb.py) assumes the offsets delta_t sit at their MAP; in a run of a few
hundred steps they do not (the optimiser has not carried them that far), so the offsets look smaller than the
prior's own spread and the fixed point lands above the tau that is best on held-out data (HWU64: 24-45 where
tau = 10 was best; docs/bora.md). What tau controls first is how far each task moves from Theta, and that can
be measured directly: the held-out NLL of theta_t(alpha) = Theta + alpha * delta_t for alpha around 1. If a
little shrinkage (alpha < 1) lowers it, the offsets are too long for held-out data: tau goes up; if longer
offsets would do better, tau goes down. In the prior-dominated regime the offsets scale as 1 / tau, so the
best shrinkage alpha* asks for tau / alpha*; the update takes a damped share of that step in log space:

    log tau <- log tau - damping * log alpha*,   alpha* from a parabola through alpha = 1/r, 1, r

(in alpha; three forwards of a validation batch, no backward). The schedule: a warm-up at tau0 while the curvature
estimate fills, one jump to the evidence fixed point (the right order of magnitude), then the held-out
correction every ``every`` steps until ``stop`` of the run (later, the decayed learning rate leaves the offsets
where they are). The held-out loss is the mean over tasks of each task's mean token NLL, as the per-task
perplexity that tau is judged by.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .tau_eb import EvidenceTau


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
    """A Trainer grad hook: tau from the evidence update, corrected on held-out data (module docstring).

    heldout_loss(alpha, step): the held-out loss with every task at Theta + alpha * delta_t, on the validation
    rows of ``step`` (a pure function of the step, so a resumed run sees the same rows).
    """

    def __init__(self, evidence: EvidenceTau, heldout_loss: Callable[[float, int], float], stop: float = 0.8,
                 every: int = 4, ratio: float = 1.5, damping: float = 0.5):
        self.evidence, self.heldout_loss = evidence, heldout_loss
        self.stop_step = max(evidence.warmup_steps + 1, int(stop * evidence.steps))
        self.every, self.ratio, self.damping = every, ratio, damping

    @property
    def history(self) -> list[list]:
        return self.evidence.history

    def state_dict(self) -> dict[str, Tensor]:
        return self.evidence.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.evidence.load_state_dict(state)

    def __call__(self, named_params) -> None:
        ev = self.evidence
        deltas, sites = ev.observe(named_params)
        step, warm = ev.step, ev.warmup_steps
        if step == warm and deltas:
            ev.set_tau(ev.target(deltas, sites))
        elif warm < step <= self.stop_step and (step - warm) % self.every == 0:
            losses = tuple(self.heldout_loss(a, step) for a in (1 / self.ratio, 1.0, self.ratio))
            if all(math.isfinite(x) for x in losses):
                lo, hi = ev.bounds
                log_tau = math.log(ev.prior.tau) - self.damping * best_shrinkage(losses, self.ratio)
                ev.set_tau(min(max(math.exp(log_tau), lo), hi))


def shrinkage_loss(prior, batcher) -> Callable[[float, int], float]:
    """The held-out loss for HeldOutTau on a BoraPrior: ``batcher`` draws validation rows (balanced over tasks);
    the model runs in eval mode without gradients at theta_t = Theta + alpha * (theta_t - Theta), and the next
    training step puts the trained values back (the prior's model sets them on every forward)."""
    mtm = prior.mtm

    def loss(alpha: float, step: int) -> float:
        batch = {k: v.to(mtm.device) for k, v in batcher.batch(step).items()}
        shrunk = {k: (Theta + alpha * (theta - Theta), Theta) for k, (theta, Theta) in prior.values().items()}
        was = mtm.training
        mtm.eval()
        try:
            mtm.set_params(shrunk)
            with torch.no_grad():
                nll, ntok = mtm.row_nll(batch)
        finally:
            mtm.train(was)
        tasks = batch["task_ids"]
        per_task = [float(nll[tasks == t].sum() / ntok[tasks == t].sum().clamp(min=1)) for t in tasks.unique()]
        return sum(per_task) / len(per_task)

    return loss
