"""A registry on disk and what is built from it: data, the multi-task model, training and evaluation."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from models.base import load_base
from models.bora import BoraPrior, site_of
from models.multitask import MultiTaskModel
from models.registry import ADAPTERS
from models.regularisers import training_extras
from models.trainer import Trainer, TrainReport
from tasks.batching import MixedBatcher, Tokenized, eval_batches, tokenize
from tasks.data import TaskData, load_task
from tasks.registry import ConfigError, load_config
from tasks.schema import HubConfig

from . import router as router_mod
from . import store as store_mod


class Workspace:
    """tasks.yaml plus the objects built from it, each loaded once and only when needed."""

    def __init__(self, config: str | Path = "tasks.yaml", cfg: HubConfig | None = None):
        self.config_path = Path(config)
        self.cfg = cfg or load_config(self.config_path, ADAPTERS.keys())
        self.base_dir = self.config_path.resolve().parent
        self.store = self.base_dir / self.cfg.store
        self._data: dict[str, TaskData] = {}
        self._base = None

    def base(self):
        if self._base is None:
            self._base = load_base(self.cfg.base_model)
        return self._base

    def data(self, name: str) -> TaskData:
        if name not in self._data:
            if self.cfg.task(name).data is None:
                raise ConfigError([f"tasks({name}).data: this task has no data source (inference only); "
                                   "add one to train or evaluate it"], self.config_path)
            self._data[name] = load_task(self.cfg.task(name), self.base_dir, self.cfg.training.seed)
        return self._data[name]

    @functools.cache
    def tokens(self, name: str, split: str) -> Tokenized:
        _, tok = self.base()
        return tokenize(tok, getattr(self.data(name), split), self.cfg.training.max_length)

    def select(self, names: list[str] | None) -> list[str]:
        if not names:
            return self.cfg.task_names
        unknown = [n for n in names if n not in self.cfg.task_names]
        if unknown:
            raise ConfigError([f"--tasks: unknown task(s) {', '.join(unknown)} "
                               f"(registered: {', '.join(self.cfg.task_names)})"], self.config_path)
        return names

    def new_model(self) -> MultiTaskModel:
        lm, tok = self.base()
        return MultiTaskModel(lm, tok, self.cfg.base_model, [(t.name, self.cfg.adapter_of(t)) for t in self.cfg.tasks])

    def trained_model(self) -> tuple[MultiTaskModel, dict]:
        """The stored hub on the registry's base model; tasks must match the registry."""
        state = store_mod.read_state(self.store)
        lm, tok = self.base()
        mtm = store_mod.build(state, lm, tok)
        store_mod.load_into(mtm, self.store, state)
        return mtm, state

    # -- training ----------------------------------------------------------------------------------
    def train(self, names: list[str] | None = None, steps: int | None = None, tau=None, resume: bool = False,
              progress: bool = True, fit_router: bool = True) -> TrainReport:
        """Train (all tasks, or ``names`` with the rest frozen) and save the store.

        tau: overrides the registry's; "auto" searches it on the validation split (hub/tau_search.py).
        fit_router: refit the router on the new adapters (skipped for intermediate runs of a search).
        """
        cfg, tcfg = self.cfg, self.cfg.training
        if not cfg.tasks:
            raise ConfigError(["tasks: no tasks registered (add some with `borahub tasks add`)"], self.config_path)
        chosen = self.select(names)
        if steps is not None and steps < 1:
            raise ConfigError([f"--steps: must be >= 1 (got {steps})"], self.config_path)
        store_mod.check_target(self.store)  # before any work: never train for a store that cannot be saved
        tau = cfg.prior.tau if tau is None else tau
        if tau == "auto":
            from .tau_search import search_tau

            return search_tau(self, names, steps, progress, fit_router=fit_router)
        mtm = self.new_model()
        init = mtm.init_params(tcfg.seed)
        frozen_ids: list[int] = []
        stored_info: dict[str, dict] = {}
        if names:  # train a subset: the other tasks and Theta stay at their stored values
            if tau == "shared":
                raise ConfigError(["--tasks: with tau 'shared' every task is the one frozen Theta; "
                                   "train all tasks instead"], self.config_path)
            state = store_mod.read_state(self.store)
            init = _warm_start(mtm, store_mod.read_params(self.store, state, mtm), init)
            frozen_ids = [i for i, n in enumerate(cfg.task_names) if n not in chosen]
            stored_info = {t["name"]: {k: v for k, v in t.items() if k not in ("name", "group", "adapter")}
                           for t in state["tasks"]}
        # Frozen tasks never appear in a batch, so their size (and data, possibly none) is not needed.
        sizes = torch.tensor([len(self.data(n).train) if n in chosen else 0 for n in cfg.task_names],
                             dtype=torch.float32)
        _, tok = self.base()
        batcher = MixedBatcher({i: self.tokens(n, "train") for i, n in enumerate(cfg.task_names) if n in chosen},
                               tcfg.batch_size, tcfg.sampling, tcfg.seed, tok.pad_token_id)
        extras = training_extras(mtm, cfg.tasks, tau, tcfg.lr)  # HiddenKey loss, GMT mask + masked Adam
        prior = BoraPrior(mtm, tau, sizes, init, loss_terms=extras.loss_terms, centred=extras.centred_groups)
        steps = steps or tcfg.steps
        run_id = {"tasks": cfg.task_names, "train": chosen, "tau": tau, "seed": tcfg.seed, "steps": steps,
                  "batch": tcfg.batch_size, "lr": tcfg.lr,
                  "lr_schedule": tcfg.lr_schedule, "base": mtm.fingerprint, "sampling": tcfg.sampling,
                  "max_length": tcfg.max_length, "grad_accum": tcfg.grad_accum,
                  "adapters": {t.name: [cfg.adapter_of(t).group_key(),  # a resume must not mix optimiser setups
                                        t.hiddenkey and t.hiddenkey.model_dump(), t.gmt and t.gmt.model_dump()]
                               for t in cfg.tasks}}
        hooks = ([freeze_hook(prior, frozen_ids)] if frozen_ids else []) + extras.grad_hooks
        trainer = Trainer(prior, batcher, steps=steps, lr=tcfg.lr, lr_schedule=tcfg.lr_schedule, seed=tcfg.seed,
                          grad_accum=tcfg.grad_accum,
                          checkpoint_every=tcfg.checkpoint_every, checkpoint_dir=store_mod.checkpoint_dir(self.store),
                          run_id=run_id, grad_hooks=hooks, optimizer_factory=extras.optimizer_factory)
        report = trainer.fit(resume=resume, progress=progress)
        params = prior.values()
        if frozen_ids:  # tau = 0 would reset Theta to the task mean; a subset run keeps the stored one
            params = {k: (theta, init[k][1]) for k, (theta, _) in params.items()}
        mtm.set_params(params)
        info = {n: {"n_train": len(self.data(n).train), "n_test": len(self.data(n).test)} if n in chosen
                else stored_info.get(n, {}) for n in cfg.task_names}
        specs = {t.name: cfg.adapter_of(t) for t in cfg.tasks}
        store_mod.save(self.store, mtm, tau, info, specs,
                       metrics={"steps": report.steps, "train_nll": report.last_nll})
        if fit_router:
            router_mod.fit_and_save(self, mtm, progress=progress)  # after save: save rebuilds the store folder
        return report

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self, names: list[str] | None = None, split: str = "test", max_docs: int | None = None,
                 mtm: MultiTaskModel | None = None) -> dict[str, dict]:
        """Held-out perplexity per task (each row routed to its own task) and of the base model alone."""
        if mtm is None:
            mtm, _ = self.trained_model()
        if max_docs is not None and max_docs < 1:
            raise ConfigError([f"--max-docs: must be >= 1 (got {max_docs})"], self.config_path)
        max_docs = max_docs or self.cfg.training.eval_docs
        _, tok = self.base()
        out = {}
        for name in self.select(names):
            if name not in mtm.task_names:
                raise store_mod.StoreError(f"task {name!r} is registered but not trained yet "
                                           f"(run `borahub train --tasks {name}`)")
            toks = self.tokens(name, split)
            toks = Tokenized(toks.ids[:max_docs], toks.n_prompt[:max_docs])
            tid = mtm.task_id(name)
            bs, pad = self.cfg.training.batch_size, tok.pad_token_id
            ppl = mtm.perplexity(eval_batches(toks, tid, bs, pad))
            base = mtm.perplexity(eval_batches(toks, tid, bs, pad), adapters=False)
            out[name] = {"perplexity": ppl, "base_perplexity": base, "docs": len(toks.ids),
                         "n_train": len(self.data(name).train)}
        return out


def _warm_start(mtm: MultiTaskModel, stored: dict, init: dict) -> dict:
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
