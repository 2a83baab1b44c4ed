"""LoRA (Hu et al. 2021): dW = B A (alpha / r), A Kaiming-uniform, B zero, so dW = 0 at init."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.schema import AdapterSpec

from .adapter import kaiming_uniform, project_in, project_out


class LoRA:
    name = "lora"

    def shapes(self, spec: AdapterSpec, base: nn.Linear, frozen) -> dict[str, tuple[int, ...]]:
        return {"A": (spec.rank, base.in_features), "B": (base.out_features, spec.rank)}

    def frozen(self, spec: AdapterSpec, base: nn.Linear) -> dict[str, Tensor]:
        return {}

    def init(self, spec: AdapterSpec, base: nn.Linear, frozen, gen) -> dict[str, Tensor]:
        return {"A": kaiming_uniform((spec.rank, base.in_features), base.in_features, gen),
                "B": torch.zeros(base.out_features, spec.rank)}

    def delta(self, x: Tensor, p: dict[str, Tensor], w: Tensor | None, frozen, spec: AdapterSpec) -> Tensor:
        return project_out(project_in(x, p["A"]), p["B"], w, spec.alpha / spec.rank)

    def delta_one(self, x: Tensor, p: dict[str, Tensor], frozen, spec: AdapterSpec) -> Tensor:
        return F.linear(F.linear(x, p["A"]) * (spec.alpha / spec.rank), p["B"])

    def to_lora(self, p: dict[str, Tensor], frozen, spec: AdapterSpec) -> tuple[Tensor, Tensor, float]:
        return p["A"], p["B"], spec.alpha
