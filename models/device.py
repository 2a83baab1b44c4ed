"""Where and in what precision the frozen base runs, and the ``accelerate`` Accelerator that trains on it.

``training.device``: auto (CUDA, else MPS, else CPU), cpu, cuda or mps. Under ``accelerate launch`` each process
takes the device the launcher gave it (``cuda:<local rank>``, or the CPU with gloo). ``training.precision``:
fp32, bf16, fp16, or auto (bf16 on a CUDA device that supports it, else fp32). The frozen base is loaded in
that precision; adapters and the BoRA prior keep float32 master values and the forward runs under the
Accelerator's autocast. ``BORAHUB_DEVICE`` / ``BORAHUB_PRECISION`` (what the CLI's ``--device`` /
``--precision`` set) override the registry.
"""
from __future__ import annotations

import os

import torch

from tasks.schema import DEVICES, PRECISIONS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ENV = {"device": "BORAHUB_DEVICE", "precision": "BORAHUB_PRECISION"}


class DeviceError(Exception):
    """The requested device or precision is not available here (user-facing)."""


def setting(name: str, registry_value: str) -> str:
    """The environment override if set, else the registry's value."""
    env = os.environ.get(ENV[name])
    allowed = DEVICES if name == "device" else PRECISIONS
    if env:
        if env not in allowed:
            raise DeviceError(f"{ENV[name]}={env!r}: must be one of {', '.join(allowed)}")
        return env
    return registry_value


def _mps() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str) -> torch.device:
    """The torch device for a ``training.device`` value (the launcher's per-process device when distributed)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("training.device: cuda was asked for but no CUDA device is available here")
    if name == "mps" and not _mps():
        raise DeviceError("training.device: mps was asked for but MPS is not available here")
    if name == "cpu" or name == "auto" and not (torch.cuda.is_available() or _mps()):
        return torch.device("cpu")
    if name == "mps" or name == "auto" and not torch.cuda.is_available():
        return torch.device("mps")
    from accelerate import PartialState

    return PartialState().device  # cuda:<local rank> under `accelerate launch`, else the current CUDA device


def resolve_precision(name: str, device: torch.device) -> str:
    """fp32 | bf16 | fp16 for a ``training.precision`` value on ``device``."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise DeviceError("training.precision: fp16 needs a GPU; on the CPU use bf16 or fp32")
    return name


def launched_processes() -> int:
    """How many processes a launcher (accelerate launch, torchrun) started for this job; 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def accelerator(device: torch.device, precision: str, grad_accum: int):
    """The Accelerator for one training run. In a single process a run may follow another with other settings
    (a tau search, tests), so accelerate's process-wide state is reset first; under a launcher it is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState, PartialState

    if launched_processes() == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        PartialState._reset_state()
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed, gradient_accumulation_steps=grad_accum)
    if acc.num_processes > 1 and device.type != acc.device.type:
        raise DeviceError(f"training.device: {device.type} asked for, but the launcher gave {acc.device}")
    return acc
