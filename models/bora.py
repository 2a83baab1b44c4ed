"""BoRA (Eide and Frigessi 2024, sec. 2): a hierarchical prior that ties per-task adapters.

    Theta_g                ~ flat (improper uniform)            one per adapter group, outside the plate
    theta_{g,t} | Theta_g  ~ Normal(Theta_g, tau^-1/2 I)         inside pyro.plate("tasks_g", T_g)
    data_t | theta_t       : factor  -N_t * mean NLL_t(minibatch)  the LM likelihood scaled to task size

MAP over {theta, Theta} with an AutoDelta guide and a torch optimiser (Pyro's svi_torch pattern).
Here tau is a Gaussian precision: the penalty per task is tau/2 * ||theta_t - Theta||^2. The reference code
uses an unsquared Frobenius norm tau * ||.||, so its tau values are not comparable (docs/bora.md).

  tau = 0        theta_t get a flat prior: independent tasks, no coupling gradient at all;
  tau = shared   (infinity) every task uses Theta itself: one shared adapter.
"""
from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_value
from torch import Tensor

from .multitask import MultiTaskModel

# Guide parameters live in their guide, not in Pyro's global param store: two hubs in one process
# (a tau sweep, a warm start, tests) must not share parameters by name.
pyro.settings.set(module_local_params=True)


class BoraPrior:
    """The Pyro model + MAP guide over every group's (theta, Theta)."""

    def __init__(self, mtm: MultiTaskModel, tau: float | str, sizes: Tensor,
                 init: dict[str, tuple[Tensor, Tensor]], loss_terms=None):
        self.mtm, self.tau = mtm, tau
        self.sizes = sizes.float()  # training documents per task (global id order)
        self.loss_terms = loss_terms  # optional callable(batch) -> (nll_sum, ntok, extra_loss_per_row)
        self.last_nll = float("nan")  # mean token NLL of the last batch, for progress bars
        self.last_tokens = 0
        if tau == "shared":
            for g in mtm.groups:
                g.share_theta()
        values = {}
        for i, g in enumerate(mtm.groups):
            theta, Theta = init[g.key]
            values[f"Theta_{i}"] = Theta
            if tau != "shared":
                values[f"theta_{i}"] = theta
        self.guide = AutoDelta(self.model, init_loc_fn=init_to_value(values=values))
        self.elbo = Trace_ELBO()

    def model(self, batch: dict[str, Tensor]) -> None:
        for i, g in enumerate(self.mtm.groups):
            Theta = pyro.sample(f"Theta_{i}", dist.ImproperUniform(constraints.real, (), (g.dim,)))
            if self.tau == "shared":
                g.flat = Theta.expand(g.n_tasks + 1, g.dim)
                continue
            with pyro.plate(f"tasks_{i}", g.n_tasks):
                if self.tau == 0:
                    theta = pyro.sample(f"theta_{i}", dist.ImproperUniform(constraints.real, (g.n_tasks,), (g.dim,)))
                else:
                    theta = pyro.sample(f"theta_{i}", dist.Normal(Theta, float(self.tau) ** -0.5).to_event(1))
            g.flat = torch.cat([theta, Theta[None]])
        if self.loss_terms is not None:
            nll, ntok, extra = self.loss_terms(batch)
        else:
            (nll, ntok), extra = self.mtm.row_nll(batch), 0.0
        t = batch["task_ids"]
        counts = torch.bincount(t, minlength=len(self.sizes)).to(nll.dtype)
        scale = self.sizes.to(nll.device)[t] / counts[t]  # each task's minibatch scaled to its dataset
        per_row = nll / ntok.clamp(min=1) + extra
        self.last_nll = float((nll.sum() / ntok.sum().clamp(min=1)).detach())
        self.last_tokens = int(ntok.sum())
        pyro.factor("lm", -(scale * per_row).sum())

    def parameters(self):
        return self.guide.parameters()

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Negative log joint (prior + scaled likelihood) at the current MAP point."""
        return self.elbo.differentiable_loss(self.model, self.guide, batch)

    def values(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Current per-group (theta, Theta); for tau=shared, theta_t = Theta; for tau=0, Theta is set to
        the task mean (the MAP of Theta given theta under any finite tau)."""
        med = {k: v.detach() for k, v in self.guide.median().items()}
        out = {}
        for i, g in enumerate(self.mtm.groups):
            Theta = med[f"Theta_{i}"]
            theta = Theta.expand(g.n_tasks, -1).clone() if self.tau == "shared" else med[f"theta_{i}"].clone()
            if self.tau == 0:
                Theta = theta.mean(0)
            out[g.key] = (theta, Theta.clone())
        return out


def plain_penalty(theta: Tensor, Theta: Tensor, tau: float) -> Tensor:
    """The same prior written in plain torch (for the overhead benchmark): tau/2 * sum ||theta_t - Theta||^2."""
    return 0.5 * tau * (theta - Theta).pow(2).sum()
