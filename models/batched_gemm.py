"""Per-row matmuls that read each row's adapter in place: MKL's pointer-array batched GEMM.

In a mixed batch every row multiplies its input by its own adapter's matrices. ``torch.bmm`` needs those
matrices copied into one (N, ...) tensor first (an index_select per module, ~2% of a 64-row forward on
SmolLM2-135M); MKL's ``cblas_sgemm_batch`` takes an array of pointers instead, so each row's GEMM reads its
adapter straight from the stacked parameters. PyTorch's x86 CPU wheels link MKL into libtorch_cpu and export
that symbol. Where it is missing (other BLAS builds), where ``BORAHUB_NO_MKL_BATCH=1`` is set, or for inputs
this path does not cover (autograd, other dtypes or devices, unusual strides), ``lora_rows`` returns None and
callers gather and use bmm, with the same result.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch
from torch import Tensor

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_ptr = ctypes.c_void_p


def _load():
    if os.environ.get("BORAHUB_NO_MKL_BATCH") == "1":
        return None
    try:
        fn = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).cblas_sgemm_batch
    except (OSError, AttributeError):
        return None
    fn.restype = None
    return fn


_sgemm_batch = _load()


def available() -> bool:
    return _sgemm_batch is not None


@functools.lru_cache(maxsize=32)
def _arange(n: int) -> Tensor:
    return torch.arange(n)


def row_pointers(t: Tensor, index: Tensor | None = None) -> Tensor:
    """The addresses of t[i] for i in ``index`` (every i when None), as an int64 tensor."""
    i = _arange(t.shape[0]) if index is None else index
    return (i * (t.stride(0) * t.element_size())).add_(t.data_ptr())


def _gemm(trans_a: bool, trans_b: bool, m: int, n: int, k: int, alpha: float, a: Tensor, lda: int, b: Tensor,
          ldb: int, c: Tensor, ldc: int) -> None:
    """C_i = alpha op(A_i) op(B_i) for every i, row-major float32; a, b, c: int64 pointer tensors of one length."""
    i, f = ctypes.c_int, ctypes.c_float
    ref = ctypes.byref  # a group of one (every product has one shape): each per-group argument is one value
    with torch.profiler.record_function("borahub::sgemm_batch"):  # so that profiles show this foreign call
        _sgemm_batch(i(_ROW_MAJOR), ref(i(_TRANS if trans_a else _NO_TRANS)), ref(i(_TRANS if trans_b else _NO_TRANS)),
                     ref(i(m)), ref(i(n)), ref(i(k)), ref(f(alpha)), _ptr(a.data_ptr()), ref(i(lda)),
                     _ptr(b.data_ptr()), ref(i(ldb)), ref(f(0.0)), _ptr(c.data_ptr()), ref(i(ldc)), i(1),
                     ref(i(a.shape[0])))


def _rows_ok(t: Tensor) -> bool:
    """float32 on the CPU with each t[i] a dense row-major matrix."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]


def lora_rows(x: Tensor, A: Tensor, B: Tensor, slots: Tensor, scale: float) -> Tensor | None:
    """scale * x[i] A[slots[i]]^T B[slots[i]]^T for every row i: x (N, L, in), A (S, r, in), B (S, out, r), slots (N,),
    in two pointer-array GEMMs (down to (N, r, L), then up into a fresh (N, L, out)). None where not applicable."""
    if _sgemm_batch is None or torch.is_grad_enabled() or not all(_rows_ok(t) for t in (x, A, B)):
        return None
    n, length, d_in = x.shape
    r, d_out = A.shape[1], B.shape[1]
    if slots.shape != (n,) or A.shape[0] != B.shape[0] or not 0 <= int(slots.min()) <= int(slots.max()) < A.shape[0]:
        raise IndexError(f"lora_rows: slots {tuple(slots.shape)} must index the {A.shape[0]} stacked adapters, "
                         "one per row of x")
    hT = torch.empty(n, r, length)
    out = torch.empty(n, length, d_out)
    ph, pa, pb = row_pointers(hT), row_pointers(A, slots), row_pointers(B, slots)
    _gemm(False, True, r, length, d_in, 1.0, pa, d_in, row_pointers(x), d_in, ph, length)
    _gemm(True, True, length, d_out, r, scale, ph, length, pb, r, row_pointers(out), d_out)
    return out
