"""MoSLoRA (Wu et al. 2024, "Mixture-of-Subspaces in Low-Rank Adaptation", method section).

dW = B M A (alpha / r): LoRA with a learnable r x r mixer M between the down- and up-projection, which fuses
the r rank-one subspaces of LoRA. A is Kaiming-uniform (a = sqrt(5)) and B zero, as in LoRA, so dW = 0 at
init. M starts as the identity: B M A then starts exactly where LoRA's B A starts (the same A, since the mixer
draws nothing from the generator), and the mixer's learning is the only difference from LoRA (its gradient
B^T (.) (A x)^T is nonzero once B moves). Any fixed invertible M is LoRA with A' = M A; a random orthogonal start
(the previous default) is LoRA from another random start, and measured as such it moved a task by -7% to +14%
against LoRA per seed, with the mixer trained or frozen (docs/variants.md). The official code's Kaiming-uniform
M (entries within +-1/sqrt(r)) shrinks M A x to about 0.58 of A x and with it the effective learning rate; a zero
M would never train (its gradient is 0 while B = 0, and B's gradient M (.) is 0 too).
The mixer folds into B for export and merging (B' = B M), so a MoSLoRA adapter is a plain LoRA at inference
time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.schema import AdapterSpec

from .adapter import kaiming_uniform, project_in, project_out


class MoSLoRA:
    name = "moslora"

    def shapes(self, spec: AdapterSpec, base: nn.Linear, frozen) -> dict[str, tuple[int, ...]]:
        r = spec.rank
        return {"A": (r, base.in_features), "M": (r, r), "B": (base.out_features, r)}

    def frozen(self, spec: AdapterSpec, base: nn.Linear) -> dict[str, Tensor]:
        return {}

    def init(self, spec: AdapterSpec, base: nn.Linear, frozen, gen) -> dict[str, Tensor]:
        r = spec.rank
        return {"A": kaiming_uniform((r, base.in_features), base.in_features, gen),
                "M": torch.eye(r),
                "B": torch.zeros(base.out_features, r)}

    def delta(self, x: Tensor, p: dict[str, Tensor], w: Tensor | None, frozen, spec: AdapterSpec) -> Tensor:
        h = project_in(x, p["A"])  # (N, L, K, r)
        h = torch.einsum("nlkr,nksr->nlks", h, p["M"])  # mix the r subspaces, per row and choice
        return project_out(h, p["B"], w, spec.alpha / spec.rank)

    def delta_one(self, x: Tensor, p: dict[str, Tensor], frozen, spec: AdapterSpec) -> Tensor:
        return F.linear(F.linear(F.linear(x, p["A"]), p["M"]) * (spec.alpha / spec.rank), p["B"])

    def to_lora(self, p: dict[str, Tensor], frozen, spec: AdapterSpec) -> tuple[Tensor, Tensor, float]:
        return p["A"], p["B"] @ p["M"], spec.alpha
