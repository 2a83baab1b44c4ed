"""Per-task training options wired into joint training: HiddenKey (a two-pass loss) and GMT (a grad mask).

HiddenKey (Wang et al. 2024, "LoRA Meets Dropout under a Unified Framework", the HiddenKey method): the
rows of tasks with ``hiddenkey:`` run a second forward pass with fresh DropKey/HiddenCut masks; their NLL is
the mean of the two passes and the extra loss is ``kl_weight`` times the bidirectional KL between the two
passes' next-token distributions, averaged over the scored tokens (the per-token scale of the NLL that the
BoRA prior uses). Rows of other tasks run one pass with rates 0, which is the stock model bit for bit, and
get no extra loss and no second pass. The mechanics live in models/hiddenkey.py; they act only in training
mode, so evaluation and inference are unaffected.

GMT (Li et al. 2024): models/gmt.py.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from tasks.registry import ConfigError
from tasks.schema import TaskSpec

from .gmt import GradientMask
from .hiddenkey import HiddenKey, bidirectional_kl, pretrained_hidden_dropout
from .multitask import MultiTaskModel

_INSTALLED: weakref.WeakKeyDictionary[nn.Module, HiddenKey] = weakref.WeakKeyDictionary()


def hiddenkey_for(lm: nn.Module) -> HiddenKey:
    """The model's HiddenKey, installed once (a second install would stack a second set of HiddenCut hooks)."""
    if lm not in _INSTALLED:
        _INSTALLED[lm] = HiddenKey(lm)
    return _INSTALLED[lm]


class HiddenKeyLoss:
    """``BoraPrior.loss_terms``: batch -> (summed NLL (N,), scored tokens (N,), extra loss per row (N,))."""

    def __init__(self, mtm: MultiTaskModel, tasks: list[TaskSpec]):
        try:
            self.mtm, self.hk = mtm, hiddenkey_for(mtm.lm)
        except ValueError as e:  # e.g. no '*.mlp' modules, or attention not dispatched via AttentionInterface
            names = ", ".join(t.name for t in tasks if t.hiddenkey is not None)
            raise ConfigError([f"tasks({names}).hiddenkey: not supported by this base model ({e})"]) from None
        specs = [t.hiddenkey for t in tasks]  # global task id order
        self.on = torch.tensor([s is not None for s in specs])
        self.key_rate = torch.tensor([s.key_drop if s else 0.0 for s in specs])
        own = pretrained_hidden_dropout(mtm.lm.config)  # the default HiddenCut rate: what the model trained with
        self.hidden_rate = torch.tensor([(own if s.hidden_drop is None else s.hidden_drop) if s else 0.0
                                         for s in specs])
        self.kl_weight = torch.tensor([s.kl_weight if s else 0.0 for s in specs])

    def __call__(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        t = batch["task_ids"].cpu()
        try:
            self.hk.set_rows(self.key_rate[t], self.hidden_rate[t])
            logits = self.mtm(batch["input_ids"], batch["attention_mask"], batch["task_ids"]).logits
            nll, ntok = self.mtm.row_nll(batch, logits)
            extra = torch.zeros_like(nll)
            rows = self.on[t].nonzero().squeeze(1)
            if len(rows):
                sub = {k: batch[k][rows.to(batch[k].device)]  # per-row tensors (not the batch's task_counts)
                       for k in ("input_ids", "attention_mask", "labels", "task_ids")}
                self.hk.set_rows(self.key_rate[t[rows]], self.hidden_rate[t[rows]])
                logits2 = self.mtm(sub["input_ids"], sub["attention_mask"], sub["task_ids"]).logits
                nll2, _ = self.mtm.row_nll(sub, logits2)
                idx = rows.to(nll.device)
                kl = bidirectional_kl(logits[idx, :-1], logits2[:, :-1], sub["labels"][:, 1:].ne(-100))
                nll = nll.index_add(0, idx, (nll2 - nll[idx]) / 2)  # mean NLL of the two passes
                extra = extra.index_add(0, idx, self.kl_weight[t[rows]].to(kl.device) * kl)
        finally:
            self.hk.clear()
        return nll, ntok, extra


@dataclass
class TrainingExtras:
    """What the per-task options add to a training run (all empty when no task enables any)."""

    loss_terms: Callable | None = None
    grad_hooks: list[Callable] = field(default_factory=list)
    optimizer_factory: Callable | None = None
    centred_groups: set[int] = field(default_factory=set)  # groups BoraPrior must keep centred (GMT freeze_masked)


def training_extras(mtm: MultiTaskModel, tasks: list[TaskSpec], tau, lr: float) -> TrainingExtras:
    """HiddenKey loss terms and the GMT hook + masked Adam for the tasks (global id order) that enable them."""
    extras = TrainingExtras()
    if any(t.hiddenkey is not None for t in tasks):
        extras.loss_terms = HiddenKeyLoss(mtm, tasks)
    if any(t.gmt is not None for t in tasks):
        mask = GradientMask(mtm, [t.gmt.keep_ratio if t.gmt else None for t in tasks], tau,
                            [bool(t.gmt and t.gmt.freeze_masked) for t in tasks])
        if mask.freezes:  # frozen entries of theta_t must not move with Theta: keep those groups centred
            extras.centred_groups = set(mask.groups)
        extras.grad_hooks.append(mask)
        if mask.freezes:
            extras.optimizer_factory = lambda params: mask.optimizer(params, lr)
    return extras
