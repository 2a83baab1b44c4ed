"""BoRA (Eide and Frigessi 2024, sec. 2): a hierarchical prior that ties per-task adapters.

    Theta_g                ~ flat (improper uniform)            one per adapter group, outside the plate
    theta_{g,t} | Theta_g  ~ Normal(Theta_g, tau^-1/2 I)         inside pyro.plate("tasks_g", T_g)
    data_t | theta_t       : factor  -N_t * mean NLL_t(minibatch)  the LM likelihood scaled to task size

MAP over {theta, Theta} with an AutoDelta guide and a torch optimiser (Pyro's svi_torch pattern). The loss is
the negative log joint at the guide's point, -log p(data, theta, Theta): what Trace_ELBO gives for a point-mass
guide, without evaluating the Delta guide's (zero) log density over millions of parameters.

For 0 < tau < infinity the model is written non-centred, theta_t = Theta + delta_t with delta_t ~ Normal(0,
tau^-1/2 I): the same joint density (the change of variables has Jacobian 1, so the same MAP points), but
Theta now receives every task's data gradient, as the one shared adapter does, and delta_t only what is
specific to task t, shrunk by the prior. Centred, Theta learns only through the prior's pull, so under Adam
and a fixed step budget the tied tasks trained slower than one shared adapter (docs/bora.md).

While tau: auto moves tau during the run, the offsets are written in units of the prior's scale, delta_t = u_t /
sqrt(tau) with u_t ~ Normal(0, I) (``scaled``; same model again at any fixed tau), so that a new tau acts on the
offsets at once (models/tau_heldout.py says why).

Here tau is a Gaussian precision: the penalty per task is tau/2 * ||theta_t - Theta||^2. The reference code
uses an unsquared Frobenius norm tau * ||.||, so its tau values are not comparable (docs/bora.md).

  tau = 0        theta_t get a flat prior: independent tasks, no coupling gradient at all (centred);
  tau = shared   (infinity) every task uses Theta itself: one shared adapter.
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.infer.autoguide import AutoDelta, init_to_value
from torch import Tensor

from .multitask import MultiTaskModel

# Guide parameters live in their guide, not in Pyro's global param store: two hubs in one process
# (a tau sweep, a warm start, tests) must not share parameters by name.
pyro.settings.set(module_local_params=True)


class IsotropicNormal(TorchDistribution):
    """Normal(loc, precision^-1/2 I) over the last dimension: the density of Normal(loc, scale).to_event(1)
    computed in one fused pass, -precision/2 ||x - loc||^2 + d/2 log(precision / 2 pi), with the precision a
    number. (torch's Normal materialises its scale, variance and log-scale at the full parameter size.)"""

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, loc: Tensor | None, precision: float, batch_shape: torch.Size | tuple = (),
                 size: int | None = None):
        """loc (..., D), or None for a zero mean of ``size`` D."""
        self.loc, self.precision = loc, float(precision)
        self.size = loc.shape[-1] if loc is not None else int(size)
        super().__init__(torch.Size(batch_shape), torch.Size([self.size]), validate_args=False)

    def log_prob(self, value: Tensor) -> Tensor:
        diff = value if self.loc is None else value - self.loc
        return -0.5 * self.precision * diff.pow(2).sum(-1) + 0.5 * self.size * math.log(self.precision / (2 * math.pi))

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            noise = torch.randn(shape) * self.precision ** -0.5
            return noise if self.loc is None else self.loc + noise.to(self.loc)

    def expand(self, batch_shape, _instance=None):
        return IsotropicNormal(self.loc, self.precision, batch_shape, self.size)


def site_of(param_name: str) -> str:
    """The sample site a guide parameter belongs to: AutoDelta names them "locs.<site>_unconstrained"."""
    return param_name.split(".")[-1].removesuffix("_unconstrained")


class BoraPrior:
    """The Pyro model + MAP guide over every group's (theta, Theta)."""

    def __init__(self, mtm: MultiTaskModel, tau: float | str, sizes: Tensor,
                 init: dict[str, tuple[Tensor, Tensor]], loss_terms=None, centred: set[int] | None = None,
                 scaled: bool = False):
        """centred: indices of groups to write centred (theta_t sampled around Theta) although 0 < tau < inf.
        scaled: write the non-centred offsets in units of the prior's scale, delta_t = u_t / sqrt(tau) with u_t ~
        Normal(0, I), for a tau that moves during the run (tau: auto): a change of tau then shortens or lengthens
        the offsets at once, and the prior's gradient on u_t (u_t itself) does not jump with tau under Adam's
        slowly adapting second moments."""
        self.mtm, self.tau, self.scaled = mtm, tau, scaled
        self.centred = {i for i in range(len(mtm.groups)) if tau == 0 or (centred and i in centred)}
        self.sizes = sizes.float()  # training documents per task (global id order)
        self.loss_terms = loss_terms  # optional callable(batch) -> (nll_sum, ntok, extra_loss_per_row)
        self.last_nll = float("nan")  # mean token NLL of the last batch, for progress bars
        self.last_tokens = 0
        self.likelihood_weight = 1.0  # N under N data-parallel processes whose gradients are averaged
        if tau == "shared":
            for g in mtm.groups:
                g.share_theta()
        values = {}
        for i, g in enumerate(mtm.groups):
            theta, Theta = init[g.key]
            values[f"Theta_{i}"] = Theta
            if tau != "shared":
                values[self.task_site(i)] = theta if i in self.centred else (theta - Theta) * self.unit()
        self.guide = AutoDelta(self.model, init_loc_fn=init_to_value(values=values))

    def task_site(self, i: int) -> str:
        """Name of group i's per-task sample site: theta itself (centred groups, every group at tau 0) or the
        offsets delta (non-centred). Not meaningful under tau = shared, which has no per-task site."""
        return f"theta_{i}" if i in self.centred else f"u_{i}" if self.scaled else f"delta_{i}"

    def unit(self) -> float:
        """sqrt(tau) under ``scaled`` (delta_t = u_t / unit), else 1."""
        return math.sqrt(float(self.tau)) if self.scaled else 1.0

    def offsets(self, site_value: Tensor) -> Tensor:
        """delta_t from a non-centred group's site value: u_t / sqrt(tau) under ``scaled``, else the value itself
        (no copy of the (T, D) stack on the fixed-tau path)."""
        return site_value / self.unit() if self.scaled else site_value

    def model(self, batch: dict[str, Tensor]) -> None:
        for i, g in enumerate(self.mtm.groups):
            Theta = pyro.sample(f"Theta_{i}", dist.ImproperUniform(constraints.real, (), (g.dim,)))
            if self.tau == "shared":
                g.flat = Theta.expand(g.n_tasks + 1, g.dim)
                continue
            with pyro.plate(f"tasks_{i}", g.n_tasks):
                if self.tau == 0:
                    flat_prior = dist.ImproperUniform(constraints.real, (g.n_tasks,), (g.dim,))
                    theta = pyro.sample(self.task_site(i), flat_prior)
                    g.flat = torch.cat([theta, Theta[None]])
                elif i in self.centred:
                    theta = pyro.sample(self.task_site(i), IsotropicNormal(Theta, float(self.tau), (g.n_tasks,)))
                    g.flat = torch.cat([theta, Theta[None]])
                else:  # theta_t = Theta + delta_t, delta_t ~ Normal(0, tau^-1/2 I): theta_t ~ Normal(Theta, tau^-1/2 I)
                    prec = 1.0 if self.scaled else float(self.tau)  # scaled: u_t ~ N(0, I), delta_t = u_t / sqrt(tau)
                    site = pyro.sample(self.task_site(i), IsotropicNormal(None, prec, (g.n_tasks,), g.dim))
                    delta = self.offsets(site)
                    g.flat = torch.cat([delta, delta.new_zeros(1, g.dim)]) + Theta
        if self.loss_terms is not None:
            nll, ntok, extra = self.loss_terms(batch)
        else:
            (nll, ntok), extra = self.mtm.row_nll(batch), 0.0
        t = batch["task_ids"]
        counts = batch.get("task_counts")  # rows per task in the global batch (several processes share it)
        if counts is None:
            counts = torch.bincount(t, minlength=len(self.sizes))
        counts = counts.to(nll.device, nll.dtype)
        scale = self.sizes.to(nll.device)[t] / counts[t]  # each task's minibatch scaled to its dataset
        per_row = nll.float() / ntok.clamp(min=1) + extra
        self.last_nll = float((nll.sum() / ntok.sum().clamp(min=1)).detach())
        self.last_tokens = int(ntok.sum())
        pyro.factor("lm", -self.likelihood_weight * (scale * per_row).sum())

    def parameters(self):
        return self.guide.parameters()

    def loss(self, batch: dict[str, Tensor], guide=None) -> Tensor:
        """Negative log joint (prior + scaled likelihood) at the current MAP point: the model conditioned on
        the guide's point values, traced, summed. guide: the guide as wrapped for data parallelism (DDP), whose
        forward gives the same point and registers the gradient all-reduce."""
        point = (guide or self.guide)(batch)
        return -poutine.trace(poutine.condition(self.model, data=point)).get_trace(batch).log_prob_sum()

    def values(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Current per-group (theta, Theta); for tau=shared, theta_t = Theta; for tau=0, Theta is set to
        the task mean (the MAP of Theta given theta under any finite tau)."""
        med = {k: v.detach() for k, v in self.guide.median().items()}
        out = {}
        for i, g in enumerate(self.mtm.groups):
            Theta = med[f"Theta_{i}"]
            if self.tau == "shared":
                theta = Theta.expand(g.n_tasks, -1).clone()
            elif i in self.centred:
                theta = med[self.task_site(i)].clone()
                if self.tau == 0:
                    Theta = theta.mean(0)
            else:
                theta = Theta + self.offsets(med[self.task_site(i)])
            out[g.key] = (theta, Theta.clone())
        return out


def plain_penalty(delta: Tensor, tau: float) -> Tensor:
    """The non-centred prior written in plain torch (for the overhead benchmark): tau/2 * sum_t ||delta_t||^2,
    delta_t = theta_t - Theta (the constant log-normaliser left out)."""
    return 0.5 * tau * delta.pow(2).sum()
