"""The adapter-type protocol: what one file under models/ must provide to become a per-task adapter type.

An adapter type describes the per-task parameters of ONE wrapped Linear and how they change its output.
The stacked layer (models/stacked.py) owns storage and routing: parameters of all tasks of a group live
on a leading slot axis, and a forward receives them already gathered per batch row.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from tasks.schema import AdapterSpec


class AdapterType(Protocol):
    name: str

    def shapes(self, spec: AdapterSpec, base: nn.Linear, frozen: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
        """Shapes of one task's trainable parameters for this Linear."""

    def frozen(self, spec: AdapterSpec, base: nn.Linear) -> dict[str, Tensor]:
        """Buffers shared by every task of the group, computed once from the frozen weight (may be {})."""

    def init(self, spec: AdapterSpec, base: nn.Linear, frozen: dict[str, Tensor],
             gen: torch.Generator) -> dict[str, Tensor]:
        """Initial global parameters Theta; tasks start at Theta plus tiny noise."""

    def delta(self, x: Tensor, p: dict[str, Tensor], w: Tensor | None, frozen: dict[str, Tensor],
              spec: AdapterSpec) -> Tensor:
        """The output change (N, L, out) for x (N, L, in) with per-row parameters p[name]: (N, K, *shape) blended
        by w (N, K); w None means K = 1 with weight 1. A fresh tensor, owned by the caller, which accumulates the
        frozen layer's product into it (one pass fewer over the output than adding the change afterwards)."""

    def delta_one(self, x: Tensor, p: dict[str, Tensor], frozen: dict[str, Tensor], spec: AdapterSpec) -> Tensor:
        """The same when every row uses the same parameters p[name]: (*shape), in plain matmuls."""

    def to_lora(self, p: dict[str, Tensor], frozen: dict[str, Tensor],
                spec: AdapterSpec) -> tuple[Tensor, Tensor, float]:
        """An equivalent PEFT LoRA (A (r, in), B (out, r), lora_alpha) for one task's parameters."""


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, gen: torch.Generator) -> Tensor:
    """nn.init.kaiming_uniform_(a=sqrt(5)) as nn.Linear and the LoRA/MoSLoRA reference code use: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def project_in(x: Tensor, A: Tensor) -> Tensor:
    """x (N, L, in), A (N, K, r, in) -> (N, L, K, r) in one batched matmul.

    Without autograd (inference) it is computed as A x^T (N, K r, L) and returned as a transposed view: with
    K r this narrow that orientation of the batched matmul is faster on CPU, and project_out takes the view
    without a copy. With autograd the plain x A^T is kept: with the transposed form the training step
    measured 1.23x PEFT's instead of 1.02-1.04x (bench/train_step.py)."""
    n, k, r, _ = A.shape
    if torch.is_grad_enabled():
        return torch.bmm(x, A.reshape(n, k * r, -1).transpose(1, 2)).view(n, x.shape[1], k, r)
    hT = torch.bmm(A.reshape(n, k * r, -1), x.transpose(1, 2))
    return hT.transpose(1, 2).view(n, x.shape[1], k, r)


def project_out(h: Tensor, B: Tensor, w: Tensor | None, scale: float) -> Tensor:
    """scale * sum_k w_k h_k B_k^T (N, L, out) for h (N, L, K, r), B (N, K, out, r), w (N, K) or None (all 1): the
    scale and weights go on the narrow h, the sum over k into one batched matmul."""
    n, length, k, r = h.shape
    h = h * scale if w is None else h * (w * scale)[:, None, :, None]
    return torch.bmm(h.reshape(n, length, k * r), B.transpose(2, 3).reshape(n, k * r, -1))
