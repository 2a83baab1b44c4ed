"""A frozen causal LM with stacked per-task adapters: build it, run routed forwards, score rows."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.schema import AdapterSpec

from .base import fingerprint
from .registry import ADAPTERS
from .routing import Routing
from .stacked import AdapterStack, Group, build_stack


class MultiTaskModel(nn.Module):
    """``lm`` is the wrapped Hugging Face model; ``stack`` holds every task's adapter parameters.

    tasks: (name, adapter spec) in registry order; a task's global id is its index. Tasks with equal
    ``spec.group_key()`` form one group; the first task's group is primary (its Theta is the fallback).
    """

    def __init__(self, lm, tokenizer, base_name: str, tasks: list[tuple[str, AdapterSpec]]):
        super().__init__()
        self.lm, self.tokenizer, self.base_name = lm, tokenizer, base_name
        self.task_names = [n for n, _ in tasks]
        self.fingerprint = fingerprint(lm, base_name)  # before wrapping: names stay as in the base model
        by_key: dict[str, tuple[AdapterSpec, list[int]]] = {}
        for i, (_, spec) in enumerate(tasks):
            by_key.setdefault(spec.group_key(), (spec, []))[1].append(i)
        specs = [(k, spec, ADAPTERS[spec.type], ids) for k, (spec, ids) in by_key.items()]
        self.stack: AdapterStack = build_stack(lm, specs, len(tasks))
        self.stack.to(self.device)  # the stacked parameters live beside the base (float32 master values)

    @property
    def groups(self) -> list[Group]:
        return list(self.stack.groups)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    def task_id(self, name: str) -> int:
        return self.task_names.index(name)

    def locate(self, task_id: int) -> tuple[Group, int]:
        """(group, slot) that hold a task's parameters."""
        for g in self.groups:
            if task_id in g.task_ids:
                return g, g.task_ids.index(task_id)
        raise KeyError(task_id)

    def routed(self, routing: Routing | Tensor | None, weights: Tensor | None = None):
        """Context manager: forwards of ``lm`` inside it route rows by ``routing`` (models/routing.py)."""
        return self.stack.using(routing, weights)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, task_ids: Routing | Tensor | None = None,
                weights: Tensor | None = None, **kw):
        """One forward of the wrapped model, rows routed by ``task_ids`` (ids or a Routing; None = base model)."""
        with self.routed(task_ids, weights):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)

    def row_nll(self, batch: dict[str, Tensor], logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Summed token NLL and scored-token count per row, each (N,)."""
        if logits is None:
            logits = self(batch["input_ids"], batch["attention_mask"], batch.get("task_ids")).logits
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        return nll.sum(1), labels.ne(-100).sum(1)

    @torch.no_grad()
    def perplexity(self, batches, adapters: bool = True) -> float:
        """exp(mean token NLL) over batches, rows routed by their task_ids (or the base model alone)."""
        was = self.training
        self.eval()
        total, count = 0.0, 0
        for b in batches:
            b = {k: v.to(self.device) for k, v in b.items() if adapters or k != "task_ids"}
            s, n = self.row_nll(b)
            total, count = total + float(s.sum()), count + int(n.sum())
        self.train(was)
        return math.exp(total / max(count, 1))

    def init_params(self, seed: int, noise: float = 1e-4) -> dict[str, tuple[Tensor, Tensor]]:
        """Per group (theta (T_g, D), Theta (D,)): Theta at the type's init, theta_t = Theta + tiny noise
        (as the BoRA reference code does)."""
        out = {}
        for i, g in enumerate(self.groups):
            gen = torch.Generator().manual_seed(seed * 7919 + i)
            Theta = g.init_theta(gen)
            theta = Theta.expand(g.n_tasks, -1) + noise * torch.randn(g.n_tasks, g.dim, generator=gen)
            out[g.key] = (theta.contiguous(), Theta)
        return out

    def set_params(self, params: dict[str, tuple[Tensor, Tensor]]) -> None:
        """Load per-group (theta, Theta) into the stacks (for inference or after training)."""
        for g in self.groups:
            theta, Theta = params[g.key]
            g.flat = torch.cat([theta, Theta[None]]).to(g.flat.device, g.flat.dtype)

    def get_params(self) -> dict[str, tuple[Tensor, Tensor]]:
        return {g.key: (g.flat[:-1].detach().clone(), g.flat[-1].detach().clone()) for g in self.groups}
