"""The joint-training recipe: from registered tasks and their tokens to trained (theta, Theta) per group.

The hub layer says which tasks to train, on what data and where checkpoints go; this module assembles the
rest: initial values (fresh, or warm-started from a stored hub with the other tasks frozen), mixed-task
batches, the variants' extras (HiddenKey loss, GMT masks), the BoRA prior, the run id a resume must match,
and the Trainer on an ``accelerate`` Accelerator (models/device.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tasks.batching import MixedBatcher, Tokenized
from tasks.registry import ConfigError
from tasks.schema import TaskSpec, TrainingSpec

from . import device as device_mod
from .bora import BoraPrior, site_of
from .multitask import MultiTaskModel
from .regularisers import training_extras
from .tau_eb import EvidenceTau
from .tau_heldout import HeldOutTau, shrinkage_loss
from .trainer import Trainer, TrainReport


TAU0 = 1.0  # tau: auto starts here (a weak tie) and learns tau after a warm-up
HELDOUT_ROWS = 1  # tau: auto's held-out batch, in training batches (balanced over tasks): 3 forwards a probe


@dataclass
class RunSettings:
    """Where and how a run executes (what hub.json records of it)."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16

    def record(self, report: TrainReport, training: TrainingSpec) -> dict:
        """hub.json's ``run``: the process count and the rows each process trained (measured, so a run whose
        processes each trained the whole batch shows it), the global batch, device and precision."""
        return {"processes": report.processes, "rows_per_process": list(report.rows_per_process),
                "global_batch": training.batch_size, "grad_accum": training.grad_accum,
                "steps_run": report.steps - report.start_step, "device": self.device.type,
                "precision": self.precision}


def train_tasks(mtm: MultiTaskModel, tasks: list[TaskSpec], tokens: dict[str, Tokenized], training: TrainingSpec,
                tau, settings: RunSettings, *, steps: int | None = None, stored: dict | None = None,
                checkpoint_dir: Path | None = None, resume: bool = False, progress: bool = True,
                source: str | Path = "tasks.yaml", validation: dict[str, Tokenized] | None = None,
                on_step=None) -> tuple[dict, TrainReport]:
    """Train the tasks in ``tokens`` (all of ``tasks``, or a subset warm-started from ``stored`` params with the
    others and Theta frozen). Returns ({group key: (theta, Theta)} in float32 on the CPU, the report; only the
    report's main process should save). ``validation``: the tasks' validation tokens, which tau: auto judges its
    tau on (without any, tau: auto is the evidence update alone). ``on_step``: the Trainer's per-step callback."""
    names = [t.name for t in tasks]
    chosen = [n for n in names if n in tokens]
    subset = len(chosen) < len(names)
    init = mtm.init_params(training.seed)
    frozen_ids: list[int] = []
    if subset:
        init = warm_start(mtm, stored or {}, init)
        frozen_ids = [i for i, n in enumerate(names) if n not in tokens]
    init = {k: (a.to(mtm.device), b.to(mtm.device)) for k, (a, b) in init.items()}
    # Frozen tasks never appear in a batch, so their size (and data, possibly none) is not needed.
    sizes = torch.tensor([len(tokens[n].ids) if n in tokens else 0 for n in names], dtype=torch.float32)
    batcher = MixedBatcher({i: tokens[n] for i, n in enumerate(names) if n in tokens},
                           training.batch_size, training.sampling, training.seed, mtm.tokenizer.pad_token_id)
    learn_tau = tau == "auto"
    if learn_tau and subset:
        raise ConfigError(["--tasks: tau 'auto' learns tau from every task's offsets; train a subset at a number "
                           "(the stored hub's tau)"], source)
    start_tau = TAU0 if learn_tau else tau
    extras = training_extras(mtm, tasks, start_tau, training.lr)  # HiddenKey loss, GMT mask + masked Adam
    held_out = held_out_batcher(names, validation or {}, training, mtm.tokenizer.pad_token_id) if learn_tau else None
    prior = BoraPrior(mtm, start_tau, sizes, init, loss_terms=extras.loss_terms, centred=extras.centred_groups,
                      scaled=held_out is not None)  # the evidence update reads delta's gradients
    steps = steps or training.steps
    hooks = ([freeze_hook(prior, frozen_ids)] if frozen_ids else []) + extras.grad_hooks
    if learn_tau:
        share = torch.zeros(len(names))
        share[torch.as_tensor(batcher.tasks)] = torch.as_tensor(batcher.probs, dtype=torch.float32)
        hooks.append(tau_hook(prior, share * training.batch_size * training.grad_accum, sizes, steps, held_out))
    acc = device_mod.accelerator(settings.device, settings.precision, training.grad_accum)
    if training.batch_size < acc.num_processes:
        raise ConfigError([f"training.batch_size: {training.batch_size} is less than the number of processes "
                           f"({acc.num_processes}); each process trains a share of every batch"], source)
    trainer = Trainer(prior, batcher, steps=steps, lr=training.lr, lr_schedule=training.lr_schedule,
                      seed=training.seed, grad_accum=training.grad_accum, checkpoint_every=training.checkpoint_every,
                      checkpoint_dir=checkpoint_dir, run_id=run_id(mtm, tasks, chosen, tau, steps, training),
                      grad_hooks=hooks, optimizer_factory=extras.optimizer_factory, accelerator=acc,
                      max_grad_norm=training.max_grad_norm, on_step=on_step)
    report = trainer.fit(resume=resume, progress=progress)
    if learn_tau:
        report.tau_history = hooks[-1].history
    params = {k: (theta.float().cpu(), Theta.float().cpu()) for k, (theta, Theta) in prior.values().items()}
    if frozen_ids:  # tau = 0 would reset Theta to the task mean; a subset run keeps the stored one
        params = {k: (theta, init[k][1].cpu()) for k, (theta, _) in params.items()}
    return params, report


def held_out_batcher(names: list[str], validation: dict[str, Tokenized], training: TrainingSpec,
                     pad_id: int) -> MixedBatcher | None:
    """Balanced batches of the tasks' validation rows for tau: auto (None when no task has any)."""
    data = {i: validation[n] for i, n in enumerate(names) if n in validation and validation[n].ids}
    if not data:
        return None
    return MixedBatcher(data, HELDOUT_ROWS * training.batch_size, "balanced", training.seed + 1, pad_id)


def tau_hook(prior: BoraPrior, rows_per_step, sizes, steps: int, held_out: MixedBatcher | None):
    """tau: auto's hook: the held-out shrinkage test (models/tau_heldout.py), or the evidence update
    (models/tau_eb.py) when no task has validation rows."""
    if held_out is not None:
        return HeldOutTau(prior, shrinkage_loss(prior, held_out), steps, TAU0)
    return EvidenceTau(prior, rows_per_step, sizes, steps, TAU0)


def run_id(mtm: MultiTaskModel, tasks: list[TaskSpec], chosen: list[str], tau, steps: int,
           t: TrainingSpec) -> dict:
    """What a checkpoint must match to be resumed: never the process count, device or precision, so a run
    resumes on any of them (the global batch of a step is the same)."""
    return {"tasks": [x.name for x in tasks], "train": chosen, "tau": tau, "seed": t.seed, "steps": steps,
            "batch": t.batch_size, "lr": t.lr, "lr_schedule": t.lr_schedule,
            "base": {k: v for k, v in mtm.fingerprint.items() if k != "weights_hash"},  # the same at any precision
            "sampling": t.sampling, "max_length": t.max_length, "grad_accum": t.grad_accum,
            **({"max_grad_norm": t.max_grad_norm} if t.max_grad_norm else {}),  # unset: as runs before it
            "adapters": {x.name: [mtm.locate(i)[0].key,  # a resume must not mix optimiser setups
                                  x.hiddenkey and x.hiddenkey.model_dump(), x.gmt and x.gmt.model_dump()]
                         for i, x in enumerate(tasks)}}


def warm_start(mtm: MultiTaskModel, stored: dict, init: dict) -> dict:
    """Start from a stored hub (``store.read_params``): known tasks keep their parameters, new tasks start
    at the stored Theta of their group (cold start from the prior), plus the same tiny noise as a fresh run."""
    out = {}
    for g in mtm.groups:
        theta, Theta = init[g.key]
        theta = theta.clone()
        if g.key in stored:
            thetas, stored_Theta = stored[g.key]
            noise = theta - Theta
            Theta = stored_Theta.clone()
            for slot, tid in enumerate(g.task_ids):
                name = mtm.task_names[tid]
                theta[slot] = thetas[name] if name in thetas else Theta + noise[slot]
        out[g.key] = (theta, Theta)
    return out


def freeze_hook(prior: BoraPrior, frozen_ids: list[int]):
    """Zero the gradients of frozen tasks and of every Theta (Adam then leaves them exactly unchanged)."""
    rows = {prior.task_site(i): [g.task_ids.index(t) for t in frozen_ids if t in g.task_ids]
            for i, g in enumerate(prior.mtm.groups)}

    def hook(named_params):
        for name, p in named_params:
            if p.grad is None:
                continue
            site = site_of(name)
            if site.startswith("Theta_"):
                p.grad.zero_()
            elif rows.get(site):
                p.grad[rows[site]] = 0

    return hook
