"""GMT: gradient-mask tuning (Li et al. 2024, "Gradient-Mask Tuning Elevates the Upper Limits of LLM
Performance", method section).

The trainer accumulates the gradients of ``grad_accum`` micro-batches; before the optimiser step, GMT keeps
in each parameter tensor only the entries with the largest |grad| (a ``keep_ratio`` share) and zeroes the
rest. Here a "tensor" is one module parameter (e.g. LoRA A of one q_proj) of one task's slot in its group's
flat vector, so every adapter type is masked the same way, and only the rows of tasks with ``gmt:`` are
touched. A slice of n entries keeps exactly max(1, round(keep_ratio * n)) of them.

For 0 < tau < inf a group is written non-centred (models/bora.py, theta_t = Theta + delta_t) and GMT masks each
task's own offset delta_t, while Theta, which every task's data trains, takes its gradient whole. (Kept centred,
Theta learns only through the prior's pull: at the bench's tau = 1000 LoRA + GMT then ended 41% worse than LoRA
even at keep 0.8, trained slower by the parametrisation, not by the mask.) With ``freeze_masked`` the group stays
centred, so that a task's masked entries of theta_t really stay put. At tau = 0 every group is centred and
theta_t is the task's whole adapter. Under tau = shared, Theta is the one adapter every task trains, and it is
masked like a task slice with the largest keep_ratio of its group's GMT tasks (no task keeps less than it
asked for).

The masked gradient goes to the hub's plain Adam (the default), as it would in a standard trainer: a masked
entry gets no new gradient, while its momentum still moves it a little and its moments decay. With
``freeze_masked: true`` a task's masked entries instead stay exactly as they were under :class:`MaskedAdam`:
parameter, both moments and the entry's own step count (its bias correction counts only the steps it took part
in). That strict reading updates each entry on about keep_ratio of the steps, i.e. it trains like LoRA at
keep_ratio x the learning rate: at the converged bench (BBC topics, 45 steps, keep 0.2) it ended 33% worse than
LoRA, its validation curve still falling (docs/variants.md).

The default keep_ratio is 0.8 (mask the 20% smallest |grad| of each slice). LoRA's factors are small and dense,
not the redundant full weights the paper masked: with plain Adam at keep 0.2 HWU64's label perplexity ended 3x
LoRA's (4.38 against 1.45, seed 0), the validation curve far behind LoRA's from the first evaluation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .bora import site_of
from .multitask import MultiTaskModel
from .stacked import Group


def keep_count(numel: int, keep_ratio: float) -> int:
    return max(1, round(keep_ratio * numel))


class GradientMask:
    """A Trainer grad hook: masks the accumulated gradients in place and records the masks for MaskedAdam.

    keep: per global task id, its keep_ratio or None (GMT off for that task).
    """

    def __init__(self, mtm: MultiTaskModel, keep: list[float | None], tau, freeze: list[bool] | None = None):
        freeze = freeze or [False] * len(keep)
        # guide site -> ([(keep_ratio, slot rows, freeze)], slice blocks (see _blocks), D)
        self.plan: dict[str, tuple[list[tuple[float, Tensor, bool]], list[tuple[int, Tensor]], int]] = {}
        self.groups: list[int] = []  # indices of the groups with GMT tasks
        for i, g in enumerate(mtm.groups):
            rows: dict[tuple[float, bool], list[int]] = {}
            for slot, tid in enumerate(g.task_ids):
                if keep[tid] is not None:
                    rows.setdefault((keep[tid], freeze[tid]), []).append(slot)
            if not rows:
                continue
            self.groups.append(i)
            if tau == "shared":
                self.plan[f"Theta_{i}"] = ([(max(r for r, _ in rows), torch.tensor([0]), any(f for _, f in rows))],
                                           _blocks(g), g.dim)
            else:  # the task site: theta (centred groups) or the offsets delta (non-centred), see models/bora.py
                plan = ([(r, torch.tensor(s), f) for (r, f), s in rows.items()], _blocks(g), g.dim)
                self.plan[f"theta_{i}"] = self.plan[f"delta_{i}"] = self.plan[f"u_{i}"] = plan
        self.freezes = any(f for parts, _, _ in self.plan.values() for _, _, f in parts)  # MaskedAdam needed
        self.masks: dict[Tensor, Tensor] = {}  # parameter -> bool mask of the entries the last step may change

    def __call__(self, named_params: list[tuple[str, Tensor]]) -> None:
        for name, p in named_params:
            site = site_of(name)
            if site not in self.plan or p.grad is None:
                continue
            parts, blocks, dim = self.plan[site]
            grad = p.grad.view(-1, dim)  # theta (T_g, D); Theta (D,) as one row
            mask = torch.ones_like(grad, dtype=torch.bool)
            may_change = torch.ones_like(mask)  # what MaskedAdam may touch: all but frozen tasks' masked entries
            for ratio, rows, freeze in parts:
                rows = rows.to(grad.device)
                sub = grad[rows]
                keep = torch.zeros_like(sub, dtype=torch.bool)
                for numel, cols in blocks:  # every slice of this size at once: (R, slices, numel)
                    cols = cols.to(grad.device)
                    block = sub[:, cols]
                    top = block.abs().topk(keep_count(numel, ratio), dim=-1, sorted=False).indices
                    keep[:, cols] = torch.zeros_like(block, dtype=torch.bool).scatter_(-1, top, True)
                mask[rows] = keep
                if freeze:
                    may_change[rows] = keep
            grad.masked_fill_(~mask, 0)
            self.masks[p] = may_change.view_as(p)

    def optimizer(self, params, lr: float) -> MaskedAdam:
        """The optimiser to pair with this hook (Trainer's ``optimizer_factory``)."""
        return MaskedAdam(params, self.masks, lr=lr)


def _blocks(g: Group) -> list[tuple[int, Tensor]]:
    """The group's parameter slices as column indices, one (slices, numel) block per slice size: a model
    has a handful of sizes, so masking takes a few batched top-k calls rather than one per module."""
    offsets: dict[int, list[int]] = {}
    for _, _, s in g.slices():
        offsets.setdefault(s.numel, []).append(s.offset)
    return [(n, torch.tensor(o)[:, None] + torch.arange(n)) for n, o in offsets.items()]


class MaskedAdam(torch.optim.Optimizer):
    """Adam (Kingma and Ba 2015) that skips masked entries entirely; parameters without a mask in ``masks``
    take the plain Adam step (identical to torch.optim.Adam up to rounding).

    State per entry: exp_avg, exp_avg_sq and ``step``, the number of steps the entry took part in.
    """

    def __init__(self, params, masks: dict[Tensor, Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})
        self.masks = masks

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    for key in ("step", "exp_avg", "exp_avg_sq"):
                        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                grad, m, v, t = p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]
                mask = self.masks.get(p)
                if mask is None:
                    t.add_(1)
                    m.lerp_(grad, 1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                else:  # masked entries: weight 0 in the lerp, factor 1 and addend 0 in v (exactly unchanged)
                    keep = mask.to(p.dtype)
                    t.add_(keep)
                    m.lerp_(grad, keep * (1 - beta1))
                    v.mul_(torch.where(mask, beta2, 1.0)).addcmul_(grad, grad * keep, value=1 - beta2)
                # Bias corrections per entry from its own step count; 1 - beta^t as -expm1(t log beta), which
                # float32 keeps accurate (1 - 0.999**t loses four digits). Entries never updated have m = 0.
                steps = t.clamp(min=1)
                size = torch.expm1(steps * math.log(beta1)).neg_().reciprocal_().mul_(group["lr"])
                root = torch.expm1(steps * math.log(beta2)).neg_().sqrt_()
                if mask is not None:
                    size.mul_(keep)
                p.sub_(m / (v.sqrt() / root).add_(group["eps"]) * size)
        return loss
