"""A registry on disk and what is built from it: data, the multi-task model, training and evaluation."""
from __future__ import annotations

import functools
from pathlib import Path


from models import device as device_mod
from models.base import load_base
from models.multitask import MultiTaskModel
from models.recipe import RunSettings, train_tasks
from models.registry import ADAPTERS
from models.trainer import TrainReport
from tasks.batching import Tokenized, eval_batches, tokenize
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

    @functools.cached_property
    def settings(self) -> RunSettings:
        """The device and precision everything built here runs on (training.device / .precision, or the
        BORAHUB_DEVICE / BORAHUB_PRECISION overrides)."""
        device = device_mod.resolve_device(device_mod.setting("device", self.cfg.training.device))
        precision = device_mod.resolve_precision(device_mod.setting("precision", self.cfg.training.precision), device)
        return RunSettings(device, precision)

    def base(self):
        if self._base is None:
            s = self.settings
            self._base = load_base(self.cfg.base_model, dtype=device_mod.DTYPES[s.precision], device=s.device)
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

    def templates(self, names: list[str]) -> dict[str, str]:
        """task -> prompt template, for those of ``names`` that have one: what generation wraps a raw request in,
        as training did."""
        return {t.name: t.prompt for t in self.cfg.tasks if t.prompt is not None and t.name in names}

    # -- training ----------------------------------------------------------------------------------
    def train(self, names: list[str] | None = None, steps: int | None = None, tau=None, resume: bool = False,
              progress: bool = True, fit_router: bool = True, on_step=None) -> TrainReport:
        """Train (all tasks, or ``names`` with the rest frozen) and save the store.

        tau: overrides the registry's; "auto" learns it in this run (models/tau_heldout.py), "search" chooses it on the
        validation split over several runs (hub/tau_search.py).
        fit_router: refit the router on the new adapters (skipped for intermediate runs of a search).
        on_step: called after every training step with (trainer, NLL, seconds) (models/trainer.py).
        """
        cfg, tcfg = self.cfg, self.cfg.training
        if not cfg.tasks:
            raise ConfigError(["tasks: no tasks registered (add some with `borahub tasks add`)"], self.config_path)
        chosen = self.select(names)
        if steps is not None and steps < 1:
            raise ConfigError([f"--steps: must be >= 1 (got {steps})"], self.config_path)
        store_mod.check_target(self.store)  # before any work: never train for a store that cannot be saved
        tau = cfg.prior.tau if tau is None else tau
        if tau == "search":
            if device_mod.launched_processes() > 1:
                raise ConfigError(["prior.tau: 'search' trains and evaluates several runs in turn and runs in one "
                                   "process; under a launcher give tau a number"], self.config_path)
            from .tau_search import search_tau

            return search_tau(self, names, steps, progress, fit_router=fit_router, on_step=on_step)
        mtm = self.new_model()
        stored, stored_info = None, {}
        if names:  # train a subset: the other tasks and Theta stay at their stored values
            if tau == "shared":
                raise ConfigError(["--tasks: with tau 'shared' every task is the one frozen Theta; "
                                   "train all tasks instead"], self.config_path)
            state = store_mod.read_state(self.store)
            stored = store_mod.read_params(self.store, state, mtm)
            stored_info = {t["name"]: {k: v for k, v in t.items() if k not in ("name", "group", "adapter")}
                           for t in state["tasks"]}
        tokens = {n: self.tokens(n, "train") for n in cfg.task_names if n in chosen}
        validation = ({n: self.tokens(n, "validation") for n in tokens if self.data(n).validation}
                      if tau == "auto" else None)
        params, report = train_tasks(mtm, cfg.tasks, tokens, tcfg, tau, self.settings, steps=steps,
                                     stored=stored, checkpoint_dir=store_mod.checkpoint_dir(self.store),
                                     resume=resume, progress=progress, source=self.config_path,
                                     validation=validation, on_step=on_step)
        if not report.main_process:  # data-parallel run: one process saves
            return report
        mtm.set_params(params)
        info = {n: {"n_train": len(self.data(n).train), "n_test": len(self.data(n).test)} if n in chosen
                else stored_info.get(n, {}) for n in cfg.task_names}
        specs = {t.name: cfg.adapter_of(t) for t in cfg.tasks}
        metrics = {"steps": report.steps, "train_nll": report.last_nll, "run": self.settings.record(report, tcfg)}
        if tau == "auto":
            method = ("held-out shrinkage test (models/tau_heldout.py), offsets in prior-scale units"
                      if validation else "evidence update (models/tau_eb.py)")
            metrics["tau_auto"] = {"method": method, "tau": report.tau,
                                   "history": report.tau_history}
        store_mod.save(self.store, mtm, report.tau if tau == "auto" else tau, info, specs, metrics=metrics)
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
