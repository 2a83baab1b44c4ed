"""Which CPU kernel multiplies a frozen float32 weight fastest at inference: PyTorch's default (MKL's sgemm) or
oneDNN's matmul, chosen per weight shape by timing both once on this machine (``tune``).

Why: a decode step multiplies a few rows (one token per running request) by every weight, where MKL's float32
sgemm is far from the memory bound. Measured on a 2-core AMD EPYC (AVX-512), 16 rows: the 49152 x 576 output
layer 17.6 ms with MKL against 8.7 ms with oneDNN, an MLP weight (1536 x 576) 279 against 198 us, while oneDNN
loses on small weights (192 x 576: 33 against 46 us). Which side wins depends on the CPU and the shape, hence a
timing per shape rather than a rule. The two kernels agree to float32 rounding (not bit for bit), so a process uses
one choice per shape throughout: the engine and the server, which share the process, generate the same tokens.

Only float32 CPU weights without autograd are concerned: bf16 already goes to oneDNN, and training keeps
PyTorch's differentiable ``F.linear``. Before ``tune`` (and where oneDNN's op is missing) every call is
``F.linear``. ``BORAHUB_ONEDNN=0`` keeps PyTorch's kernel everywhere, ``=1`` takes oneDNN's for every shape
without timing (reproducible runs; tests).
"""
from __future__ import annotations

import functools
import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

_ONEDNN: dict[tuple[int, int], bool] = {}  # (out, in) -> oneDNN is faster for this weight shape here
TUNE_ROWS = (1, 4, 16)  # the rows of a decode step: one token for each of 1 to 16 running requests
MARGIN = 0.9  # oneDNN must take at most this share of MKL's time (a clear win, not noise)
MAX_ROWS = 64  # inputs of more rows (a prompt's prefill) keep MKL: there oneDNN built a new primitive for every new
# prompt length, and a 16-prompt prefill measured 1.7-2.0 s against 1.45-1.9 s


@functools.cache
def _onednn_op():
    """oneDNN's linear op, or None where this torch build lacks it (looked up once: ``linear`` is on the hot path)."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return ops._linear_pointwise if ops is not None and torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


def _eligible(x: Tensor, W: Tensor) -> bool:
    return (W.dtype == torch.float32 and x.dtype == torch.float32 and x.device.type == "cpu"
            and x.numel() <= MAX_ROWS * x.shape[-1] and not torch.is_grad_enabled()
            and _ONEDNN.get(tuple(W.shape), False))


def linear(x: Tensor, W: Tensor, bias: Tensor | None = None) -> Tensor:
    """x W^T + bias with the kernel chosen for W's shape."""
    if _ONEDNN and _eligible(x, W):
        return _onednn_op()(x, W, bias, "none", [], "")
    return F.linear(x, W, bias)


def linear_add(y: Tensor, x: Tensor, W: Tensor) -> Tensor | None:
    """y + x W^T in one oneDNN call (its sum post-op) where oneDNN is chosen for W's shape, else None (the
    caller accumulates with its own addmm)."""
    if _ONEDNN and _eligible(x, W):
        return _onednn_op().binary(x, y, W, None, "add")
    return None


class KernelLinear(nn.Linear):
    """An nn.Linear (same parameters, tied or not; same state-dict keys) whose forward uses ``linear``."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.no_grad()
def tune(model: nn.Module, rows: tuple[int, ...] = TUNE_ROWS, reps: int = 3) -> dict[tuple[int, int], bool]:
    """Time both kernels on every distinct float32 CPU Linear weight shape of ``model`` (its output layer too) at
    each number of ``rows``: one pass over all of the model's weights of that shape (up to 32), as a decode step
    reads them, from memory rather than cache; interleaved, best of ``reps``. oneDNN is chosen for a shape when its
    summed time is at most MARGIN of MKL's. Lets the output layer use the choice (``KernelLinear``). Returns the
    table (also kept process-wide); each shape is timed once per process."""
    op, forced = _onednn_op(), os.environ.get("BORAHUB_ONEDNN", "")
    if op is None or forced == "0":
        return dict(_ONEDNN)
    shapes: dict[tuple[int, int], list[Tensor]] = {}
    for m in model.modules():
        W = getattr(m, "weight", None)
        if isinstance(m, nn.Linear) and isinstance(W, Tensor) and W.dtype == torch.float32 \
                and W.device.type == "cpu" and W.dim() == 2:
            same = shapes.setdefault(tuple(W.shape), [])
            if len(same) < 32 and not any(w is W for w in same):
                same.append(W)
    for shape, weights in shapes.items():
        if forced == "1":
            _ONEDNN[shape] = True
        if shape in _ONEDNN:
            continue
        mkl = dnn = 0.0
        try:
            for n in rows:
                x = torch.randn(n, shape[1])
                pair = (lambda: [F.linear(x, W) for W in weights],
                        lambda: [op(x, W, None, "none", [], "") for W in weights])
                for f in pair:
                    f()  # warm: oneDNN builds its primitive for the shape on first use
                times = [[_seconds(f) for f in pair] for _ in range(reps)]  # interleaved
                mkl += min(t[0] for t in times)
                dnn += min(t[1] for t in times)
        except RuntimeError as e:  # an op this build lacks or refuses: keep PyTorch's
            log.debug("oneDNN linear unavailable for %s: %s", shape, e)
            _ONEDNN[shape] = False
            continue
        _ONEDNN[shape] = dnn <= MARGIN * mkl
        log.debug("linear %s over rows %s: MKL %.0f us, oneDNN %.0f us", shape, rows, 1e6 * mkl, 1e6 * dnn)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is nn.Linear and _ONEDNN.get(tuple(head.weight.shape)):
        model.set_output_embeddings(KernelLinear(head))
    return dict(_ONEDNN)
