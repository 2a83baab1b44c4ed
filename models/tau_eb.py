"""tau in one training run: empirical Bayes (MacKay's evidence update) with a diagonal Laplace curvature.

MAP over tau jointly with the adapters collapses (docs/bora.md), so tau is instead set to maximise the marginal
likelihood of the task offsets delta_t = theta_t - Theta under a Laplace approximation of each task's
posterior. With F_t the diagonal curvature of task t's (size-scaled) negative log likelihood at delta_t, the
posterior precision of each coordinate is F + tau, and the evidence is stationary where

    tau = gamma / sum_t ||delta_t||^2,    gamma = sum_t sum_i F_ti / (F_ti + tau)

(gamma: how many coordinates the data determine; MacKay 1992). F is estimated during training from the
likelihood part of each task's gradient, G_t = grad_delta_t - tau * delta_t: a minibatch with c_t rows of task t
scales them by N_t / c_t, so E[G_t^2] ~ N_t^2 / c_t * E[g^2] for one document's gradient g, and the empirical
Fisher N_t E[g^2] is c_t E[G_t^2] / N_t (an exponential mean over steps). After a warm-up at tau0 (delta starts
at zero, where the update would jump to the shared extreme), tau moves toward the fixed point every step, in
log space and damped (every ``every`` steps: the fixed point costs a pass over the curvature), within
[tau_min, tau_max].
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def evidence_tau(deltas: list[Tensor], fishers: list[Tensor], tau: float) -> float:
    """MacKay's fixed-point value gamma / sum ||delta||^2 for offsets (T, D) and curvatures (T, D) per group."""
    gamma = sum(float((f / (f + tau)).sum()) for f in fishers)
    spread = sum(float(torch.linalg.vector_norm(d)) ** 2 for d in deltas)
    return gamma / max(spread, 1e-30)


class EvidenceTau:
    """A Trainer grad hook that learns the BoraPrior's tau by the evidence update above.

    rows_per_step: expected rows of each task (global id order) in one optimiser step (all micro-batches);
    sizes: training documents per task. ``history`` keeps (step, tau) for the store's metrics.
    """

    def __init__(self, prior, rows_per_step: Tensor, sizes: Tensor, steps: int, tau0: float = 1.0,
                 warmup: float = 0.25, damping: float = 0.2, decay: float = 0.9, every: int = 4,
                 bounds: tuple[float, float] = (1e-2, 1e4)):
        self.prior, self.steps = prior, steps
        self.rows, self.sizes = rows_per_step.float(), sizes.float()
        self.warmup_steps = max(1, int(warmup * steps))
        self.damping, self.decay, self.every, self.bounds = damping, decay, every, bounds
        self.prior.tau = float(tau0)
        self.sq: dict[str, Tensor] = {}  # exponential mean of G^2 per delta site
        self.step = 0
        self.history: list[list] = [[0, float(tau0)]]  # [step, tau] (JSON-shaped)

    def state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint keeps so that a resumed run continues tau where it was."""
        out = {f"sq/{k}": v for k, v in self.sq.items()}
        out["step"] = torch.tensor(self.step)
        out["history"] = torch.tensor(self.history, dtype=torch.float64)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.sq = {k[3:]: v for k, v in state.items() if k.startswith("sq/")}
        self.step = int(state["step"])
        self.history = [[int(s), float(t)] for s, t in state["history"].tolist()]
        self.prior.tau = self.history[-1][1]

    def fisher(self, site: str, task_ids: list[int]) -> Tensor:
        """Estimated curvature (T_g, D) of the tasks' scaled likelihood, from the gradient second moment."""
        ids = torch.tensor(task_ids)
        scale = (self.rows[ids] / self.sizes[ids].clamp(min=1)).to(self.sq[site].device)
        return self.sq[site] * scale[:, None]

    def __call__(self, named_params) -> None:
        tau = float(self.prior.tau)
        deltas, sites = [], []
        for name, p in named_params:
            site = name.split(".")[-1].removesuffix("_unconstrained")
            if not site.startswith("delta_") or p.grad is None:
                continue
            g = torch.sub(p.grad, p.detach(), alpha=tau)  # the likelihood's part of the gradient
            sq = self.sq[site] = self.sq[site].to(g.device) if site in self.sq else torch.zeros_like(g)
            sq.mul_(self.decay).addcmul_(g, g, value=1 - self.decay)
            deltas.append(p.detach())
            sites.append(site)
        self.step += 1
        if self.step <= self.warmup_steps or not deltas or (self.step - self.warmup_steps) % self.every:
            return
        groups = self.prior.mtm.groups
        target = evidence_tau(deltas, [self.fisher(s, groups[int(s.split("_")[1])].task_ids) for s in sites], tau)
        lo, hi = self.bounds
        keep = (1 - self.damping) ** self.every  # the same pull per step as an update every step
        log_tau = keep * math.log(tau) + (1 - keep) * math.log(min(max(target, lo), hi))
        self.prior.tau = math.exp(log_tau)
        self.history.append([self.step, self.prior.tau])
