"""Joint training: mixed-task batches, MAP of the BoRA posterior, atomic checkpoints, exact resume.

Each step is a pure function of (seed, step) and the checkpointed state (parameters + Adam moments),
so a run killed mid-way and resumed from its last checkpoint ends at the same adapters as an
uninterrupted run on the same machine.

Device placement, autocast, gradient accumulation and data parallelism go through an ``accelerate``
Accelerator. With N processes (``accelerate launch``) every process builds the same global batch of a step
and trains its rows ``rank::N``; each task's likelihood is still scaled by the global batch's row counts, and
the process's likelihood is weighted N so that DDP's gradient mean counts every row once and the prior once.
The checkpoint is written by the main process and holds no process count: a run resumes with any count.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from tasks.atomic import atomic_path
from tasks.batching import shard

from . import device as device_mod
from .bora import BoraPrior

CHECKPOINT = "checkpoint.safetensors"


class ResumeError(Exception):
    """A checkpoint exists but belongs to another run (user-facing)."""


class DivergedError(Exception):
    """The loss became NaN or inf: training stopped, nothing was saved (user-facing)."""


@dataclass
class TrainReport:
    steps: int
    start_step: int
    seconds: float
    tokens: int
    last_nll: float
    processes: int = 1
    rows_per_process: tuple[int, ...] = ()  # rows each process trained in this run (gathered, not derived)
    main_process: bool = True  # False on the other processes of a data-parallel run (they neither save nor print)
    tau: float | str | None = None  # the prior's tau at the end (learned under tau: auto)
    tau_history: list = field(default_factory=list)  # (step, tau) while tau: auto learned it
    clipped_steps: int = 0  # steps of this run whose gradient norm was above max_grad_norm (then scaled to it)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def _save_atomic(tensors: dict, metadata: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


class Trainer:
    """Optimises a BoraPrior's MAP point with Adam.

    grad_hooks: callables run on the accumulated gradients before each optimiser step (GMT masking,
    freezing tasks for a cold start); each takes the list of (name, parameter).
    lr_schedule: "constant", or "cosine" (lr * (1 + cos(pi * step / steps)) / 2); the rate is a function of
    the step alone, so a resumed run takes the same steps as an uninterrupted one.
    max_grad_norm: when given, the gradients' global norm is clipped to it after the hooks, before each step.
    """

    def __init__(self, prior: BoraPrior, batcher, *, steps: int, lr: float, seed: int, grad_accum: int = 1,
                 lr_schedule: str = "constant",
                 checkpoint_every: int = 20, checkpoint_dir: str | Path | None = None, run_id: dict | None = None,
                 grad_hooks: list[Callable] | None = None, optimizer_factory: Callable | None = None,
                 accelerator=None, max_grad_norm: float | None = None,
                 on_step: Callable[["Trainer", float, float], None] | None = None):
        """accelerator: an ``accelerate.Accelerator`` (models/device.py); default: fp32 on the model's device.
        on_step: called after every optimiser step of ``fit`` with (trainer, the step's NLL, its seconds), e.g. to
        trace gradient norms or evaluate along the way (bench/grad_norms.py, bench/variants.py)."""
        self.prior, self.batcher, self.on_step = prior, batcher, on_step
        self.steps, self.seed, self.grad_accum = steps, seed, grad_accum
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine' (got {lr_schedule!r})")
        self.lr, self.lr_schedule = lr, lr_schedule
        self.checkpoint_every = checkpoint_every
        self.checkpoint_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir else None
        self.run_id = json.dumps(run_id or {}, sort_keys=True)
        self.acc = accelerator or device_mod.accelerator(prior.mtm.device, "fp32", grad_accum)
        if self.acc.gradient_accumulation_steps != grad_accum:
            raise ValueError(f"the accelerator accumulates {self.acc.gradient_accumulation_steps} micro-batches, "
                             f"the trainer was given grad_accum={grad_accum}")
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        if batcher.batch_size < self.world:
            raise ValueError(f"training.batch_size ({batcher.batch_size}) must be at least the number of "
                             f"processes ({self.world}): each process trains a share of every batch")
        self.device = self.acc.device
        self.grad_hooks = grad_hooks or []
        self.max_grad_norm, self.clipped_steps, self.last_grad_norm = max_grad_norm, 0, float("nan")
        pyro.enable_validation(False)  # support checks on ~10^7 parameters cost more than the prior itself
        self.prior.likelihood_weight = float(self.world)  # DDP averages: N x (1/N) counts each row once
        with self.acc.autocast():
            self.prior.loss(self._batch(0, 0))  # materialise the guide's parameters
        self.named_params = [(n, p) for n, p in self.prior.guide.named_parameters()]
        factory = optimizer_factory or (lambda ps: torch.optim.Adam(ps, lr=lr))
        self.guide, self.optimizer = self.acc.prepare(self.prior.guide, factory([p for _, p in self.named_params]))
        self.step = 0
        self.rows = 0  # rows this process trained in this run
        self.last_nll = float("nan")  # the NLL of the last step taken (restored with a checkpoint)

    def _batch(self, step: int, micro: int) -> dict:
        """This process's rows of the global batch for (step, micro), on its device."""
        batch = shard(self.batcher.batch(step, micro), self.rank, self.world)
        return {k: v.to(self.device) for k, v in batch.items()}

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.checkpoint_path is None or not self.acc.is_main_process:
            return
        tensors = {f"param/{n}": p.detach().cpu() for n, p in self.named_params}
        state = self.optimizer.state_dict()
        for i, st in state["state"].items():
            for k, v in st.items():
                tensors[f"opt/{i}/{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu()
        for i, hook in enumerate(self.grad_hooks):  # hooks with state (the evidence tau) resume with it
            if hasattr(hook, "state_dict"):
                tensors.update({f"hook/{i}/{k}": v.detach().cpu() for k, v in hook.state_dict().items()})
        meta = {"step": str(self.step), "run": self.run_id, "param_groups": json.dumps(state["param_groups"]),
                "nll": repr(self.last_nll)}
        _save_atomic(tensors, meta, self.checkpoint_path)

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint if there is one; True when restored."""
        if self.checkpoint_path is None or not self.checkpoint_path.is_file():
            return False
        from safetensors import safe_open

        with safe_open(str(self.checkpoint_path), "pt") as f:
            meta = f.metadata()
        if meta.get("run") != self.run_id:
            raise ResumeError(f"{self.checkpoint_path}: checkpoint belongs to a different run "
                              "(tasks, tau, seed or steps changed); remove it or train without --resume")
        tensors = load_file(str(self.checkpoint_path))
        with torch.no_grad():
            for n, p in self.named_params:
                p.copy_(tensors[f"param/{n}"])
        state: dict = {}
        for key, v in tensors.items():
            if key.startswith("opt/"):
                _, i, k = key.split("/", 2)
                state.setdefault(int(i), {})[k] = v.to(self.device)
        self.optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        for i, hook in enumerate(self.grad_hooks):
            if hasattr(hook, "load_state_dict"):
                prefix = f"hook/{i}/"
                hook.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.step = int(meta["step"])
        self.last_nll = float(meta.get("nll", "nan"))
        return True

    # -- training ----------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        if self.lr_schedule == "cosine":
            return self.lr * 0.5 * (1.0 + math.cos(math.pi * step / self.steps))
        return self.lr

    def train_step(self) -> float:
        """One optimiser step over ``grad_accum`` micro-batches; returns the mean token NLL."""
        torch.manual_seed(self.seed * 1_000_003 + self.step)  # dropout-style randomness is per step
        self.optimizer.zero_grad(set_to_none=True)
        nll_sum, tokens = 0.0, 0
        for micro in range(self.grad_accum):
            with self.acc.accumulate(self.guide):  # DDP syncs the gradients on the last micro-batch only
                batch = self._batch(self.step, micro)
                with self.acc.autocast():
                    loss = self.prior.loss(batch, guide=self.guide)
                self.acc.backward(loss)  # divides by grad_accum
            self.rows += len(batch["task_ids"])
            nll_sum += self.prior.last_nll * self.prior.last_tokens
            tokens += self.prior.last_tokens
        if self.world > 1:  # the global batch's NLL, as one process would report it
            both = self.acc.reduce(torch.tensor([nll_sum, float(tokens)], device=self.device), "sum")
            nll_sum, tokens = float(both[0]), int(both[1])
        nll = nll_sum / max(tokens, 1)
        if not (math.isfinite(nll) and bool(torch.isfinite(loss.detach()))):
            raise DivergedError(f"training diverged at step {self.step + 1}: the loss is {float(loss.detach()):g} "
                                f"(NLL {nll:g}); the stored hub was left as it was: lower training.lr")
        for hook in self.grad_hooks:
            hook(self.named_params)
        if self.max_grad_norm is not None:
            norm = self.acc.clip_grad_norm_([p for _, p in self.named_params], self.max_grad_norm)
            self.last_grad_norm = float(norm)  # before clipping
            self.clipped_steps += int(self.last_grad_norm > self.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.optimizer.step()
        self.step += 1
        self._tokens = tokens
        self.last_nll = nll
        return nll

    def fit(self, resume: bool = False, progress: bool = True) -> TrainReport:
        if resume:
            self.load_checkpoint()
        start, t0, tokens = self.step, time.perf_counter(), 0
        self.prior.mtm.train()
        bar = tqdm(total=self.steps, initial=start, desc="train", unit="step",
                   disable=not (progress and self.acc.is_main_process))
        while self.step < self.steps:
            t_step = time.perf_counter()
            nll = self.train_step()
            if self.on_step is not None:
                self.on_step(self, nll, time.perf_counter() - t_step)
            tokens += self._tokens
            bar.update(1)
            bar.set_postfix(nll=f"{nll:.3f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
            if self.step % self.checkpoint_every == 0 or self.step == self.steps:
                self._check_finite()
                self.save_checkpoint()
        bar.close()
        self._check_finite()
        self.prior.mtm.eval()
        rows = self.acc.gather(torch.tensor([self.rows], device=self.device)) if self.world > 1 else [self.rows]
        return TrainReport(self.steps, start, time.perf_counter() - t0, tokens, self.last_nll, self.world,
                           tuple(int(r) for r in rows), self.acc.is_main_process, self.prior.tau,
                           clipped_steps=self.clipped_steps)

    def _check_finite(self) -> None:
        """Never checkpoint or hand back NaN/inf parameters (a finite loss can still overflow a step)."""
        for name, p in self.named_params:
            if not bool(torch.isfinite(p).all()):
                raise DivergedError(f"training diverged by step {self.step}: parameter {name} holds NaN or inf; "
                                    "the stored hub was left as it was: lower training.lr")
