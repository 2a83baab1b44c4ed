"""MoSLoRA (Wu et al. 2024, "Mixture-of-Subspaces in Low-Rank Adaptation", method section).

dW = B M A (alpha / r): LoRA with a learnable r x r mixer M between the down- and up-projection, which fuses
the r rank-one subspaces of LoRA. A is Kaiming-uniform (a = sqrt(5)) and B zero, as in LoRA, so dW = 0 at
init. M starts as a random orthogonal matrix: then |M A x| = |A x|, so B's gradient and dW's first steps have
LoRA's scale, while the official code's Kaiming-uniform M (entries within +-1/sqrt(r)) shrinks M A x to about
0.58 of A x (rows of norm sqrt(1/3)) and with it the effective learning rate. A zero M would never train (its
gradient is B^T (.) A^T = 0 while B = 0, and B's gradient M (.) is 0 too). Measured: docs/results/variants.md.
The mixer folds into B for export and merging (B' = B M), so a MoSLoRA adapter is a plain LoRA at inference
time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.schema import AdapterSpec

from .adapter import kaiming_uniform, project_in, project_out


def random_orthogonal(r: int, gen: torch.Generator) -> Tensor:
    """A Haar-random r x r orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal)."""
    q, upper = torch.linalg.qr(torch.randn(r, r, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(upper))[None, :]).float()


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
                "M": random_orthogonal(r, gen),
                "B": torch.zeros(base.out_features, r)}

    def delta(self, x: Tensor, p: dict[str, Tensor], w: Tensor | None, frozen, spec: AdapterSpec) -> Tensor:
        h = project_in(x, p["A"])  # (N, L, K, r)
        h = torch.einsum("nlkr,nksr->nlks", h, p["M"])  # mix the r subspaces, per row and choice
        return project_out(h, p["B"], w, spec.alpha / spec.rank)

    def delta_one(self, x: Tensor, p: dict[str, Tensor], frozen, spec: AdapterSpec) -> Tensor:
        return F.linear(F.linear(F.linear(x, p["A"]), p["M"]) * (spec.alpha / spec.rank), p["B"])

    def to_lora(self, p: dict[str, Tensor], frozen, spec: AdapterSpec) -> tuple[Tensor, Tensor, float]:
        return p["A"], p["B"] @ p["M"], spec.alpha
