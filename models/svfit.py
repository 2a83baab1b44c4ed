"""SVFit (Sun et al. 2024, "SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using
Singular Values", method section): train only the top-r singular values of each frozen weight.

With W = U S V^T, the adapted weight is W' = U_r diag(s_r + ds) V_r^T + (W - U_r diag(s_r) V_r^T), i.e.
W' = W + U_r diag(ds) V_r^T. The base Linear stays in place, so the layer adds only the delta
U_r diag(ds) V_r^T x, which is exactly zero at init (ds = 0). A task trains r numbers per matrix.

What trains is the relative change g, ds = GAIN * s_r * g (g = 0 at init). Trained directly, ds moved by about the
learning rate per Adam step whatever the singular value's size, and SmolLM2's top singular values are 10-80: at
LoRA's learning rate SVFit closed 1% of LoRA's perplexity gain on BBC topics (25 steps), 4% at a 30x rate. Relative
to s_r every matrix moves at the same pace; GAIN = 10 makes that pace GAIN x lr per step (3% at the default lr
3e-3), so SVFit groups train well at the learning rate the hub's LoRA groups use. At 25 steps on BBC topics: 25% of
LoRA's gain at GAIN 1, 60% at GAIN 10 (docs/variants.md; the converged bench: docs/results/variants.md).

U_r, s_r and V_r are frozen and shared by every task of a group (``AdapterType.frozen``). Computing them needs a
full SVD of every target matrix (about 20 s on 2 cores for SmolLM2-135M), so they are cached on disk,
keyed by a hash of the weight and the rank choice. The rank is ``spec.rank``, or with ``spec.energy`` the
smallest r whose singular values hold that share of sum(s^2) (the rank then varies per matrix and
``spec.rank`` is not used). The delta has rank r, so it exports as a LoRA with B = U_r diag(ds), A = V_r^T.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tasks.atomic import atomic_path
from tasks.schema import AdapterSpec

from .base import cache_dir

GAIN = 10.0  # ds = GAIN * s_r * g: Adam moves each singular value by about GAIN * lr of itself per step


def _ds(g: Tensor, frozen: dict[str, Tensor]) -> Tensor:
    """The change of the top singular values from the trained relative change g (any leading dimensions)."""
    return g * (GAIN * frozen["S"])


def choose_rank(singular: Tensor, spec: AdapterSpec) -> int:
    """spec.rank, or the smallest r with sum(s_1..r^2) >= energy * sum(s^2); at most min(out, in)."""
    if spec.energy is None:
        return min(spec.rank, singular.numel())
    energy = singular.double().pow(2).cumsum(0)
    return min(int((energy < spec.energy * energy[-1]).sum()) + 1, singular.numel())


def top_singular(weight: Tensor, spec: AdapterSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(U_r (out, r), s_r (r,), V_r^T (r, in)) of a frozen weight, from the disk cache when it holds them."""
    w = weight.detach().float().cpu().contiguous()
    digest = hashlib.sha256(w.numpy().tobytes()).hexdigest()[:32]
    tag = f"e{spec.energy:g}" if spec.energy is not None else f"r{spec.rank}"
    path = cache_dir() / "svd" / f"{digest}-{w.shape[0]}x{w.shape[1]}-{tag}.safetensors"
    cached = _read_cache(path)
    if cached is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)
        r = choose_rank(S, spec)
        cached = {"U": U[:, :r].contiguous(), "S": S[:r].contiguous(), "Vh": Vh[:r].contiguous()}
        _write_cache(path, cached)
    return tuple(cached[k].to(weight.device, weight.dtype) for k in ("U", "S", "Vh"))


def _read_cache(path: Path) -> dict[str, Tensor] | None:
    if not path.is_file():
        return None
    try:
        cached = load_file(str(path))
    except (OSError, SafetensorError):
        return None  # a damaged cache file is recomputed and overwritten
    return cached if {"U", "S", "Vh"} <= cached.keys() else None


def _write_cache(path: Path, tensors: dict[str, Tensor]) -> None:
    """Atomic write; a cache that cannot be written (read-only home) only costs time."""
    try:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
    except OSError:
        pass


class SVFit:
    name = "svfit"

    def frozen(self, spec: AdapterSpec, base: nn.Linear) -> dict[str, Tensor]:
        U, S, Vh = top_singular(base.weight, spec)
        return {"U": U, "S": S, "Vh": Vh}

    def shapes(self, spec: AdapterSpec, base: nn.Linear, frozen: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
        return {"g": (frozen["U"].shape[1],)}

    def init(self, spec: AdapterSpec, base: nn.Linear, frozen: dict[str, Tensor], gen) -> dict[str, Tensor]:
        return {"g": torch.zeros(frozen["U"].shape[1])}

    def delta(self, x: Tensor, p: dict[str, Tensor], w: Tensor | None, frozen: dict[str, Tensor],
              spec: AdapterSpec) -> Tensor:
        # The delta is linear in g, so blending K choices in output space blends their g: (N, r).
        g = p["g"].sum(1) if w is None else (p["g"] * w[..., None]).sum(1)
        return F.linear(F.linear(x, frozen["Vh"]) * _ds(g, frozen)[:, None, :], frozen["U"])

    def delta_one(self, x: Tensor, p: dict[str, Tensor], frozen: dict[str, Tensor], spec: AdapterSpec) -> Tensor:
        return F.linear(F.linear(x, frozen["Vh"]) * _ds(p["g"], frozen), frozen["U"])

    def to_lora(self, p: dict[str, Tensor], frozen: dict[str, Tensor], spec: AdapterSpec
                ) -> tuple[Tensor, Tensor, float]:
        r = frozen["U"].shape[1]
        ds = _ds(p["g"], frozen)
        return frozen["Vh"], frozen["U"] * ds[None, :], float(r)  # lora_alpha = r: PEFT's scale is 1
