"""`tau: auto`: choose the prior precision on the validation split, without a hand-made grid.

MAP over tau jointly with the adapters collapses (tau -> infinity, every theta_t -> Theta), so tau is chosen
by held-out evidence instead: a golden-section search over log10(tau) in [LOG_LO, LOG_HI] that minimises
the mean validation perplexity. The first candidate trains from scratch with the full step budget; every
later one warm-starts from the nearest candidate already trained and trains half as long (continuation:
the MAP point moves smoothly with tau). The chosen tau is then trained once more from scratch with the full
budget (unless the chosen candidate already was), so the hub's adapters are exactly what a run with that tau
written in tasks.yaml gives; the search history is recorded in hub.json under metrics.tau_search.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from tasks.registry import ConfigError, atomic_write_text

from . import store as store_mod

# tau from 0.01 (nearly independent tasks) to 1e4: on SmolLM2 + BBC News, at tau = 1e4 the offsets theta_t - Theta
# are ~0.2% of Theta's size (docs/bora.md), i.e. already one shared adapter
LOG_LO, LOG_HI = -2.0, 4.0
EVALUATIONS = 5  # golden-section steps: the bracket shrinks to 0.618^3 of its width after 5 evaluations
GOLDEN = (math.sqrt(5) - 1) / 2


def search_tau(ws, names=None, steps: int | None = None, progress: bool = True, fit_router: bool = True,
               evaluations: int = EVALUATIONS, log_range: tuple[float, float] = (LOG_LO, LOG_HI),
               refit: bool = True):
    """Train at the tau with the best mean validation perplexity; returns that run's TrainReport.
    refit: retrain the chosen tau from scratch with the full budget when its candidate was warm-started."""
    if names:
        raise ConfigError(["--tasks: tau 'auto' searches tau for the whole hub; give a number to train a subset"],
                          ws.config_path)
    final_store, steps = ws.store, steps or ws.cfg.training.steps
    final_store.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tau-search.", dir=final_store.parent))
    tried: dict[float, dict] = {}

    def evaluate(log_tau: float) -> float:
        log_tau = round(log_tau, 4)
        if log_tau in tried:
            return tried[log_tau]["val_perplexity"]
        warm = min(tried, key=lambda t: abs(t - log_tau), default=None)
        ws.store = work / f"tau-{log_tau:+.4f}"
        report = ws.train(tau=10.0 ** log_tau, steps=steps if warm is None else max(1, steps // 2),
                          progress=progress, warm_start=None if warm is None else tried[warm]["store"],
                          fit_router=False)
        res = ws.evaluate(split="validation")
        mean = sum(r["perplexity"] for r in res.values()) / len(res)
        tried[log_tau] = {"tau": 10.0 ** log_tau, "val_perplexity": mean, "store": ws.store,
                          "warm_start_from": None if warm is None else 10.0 ** warm, "steps": report.steps,
                          "report": report}
        if progress:
            print(f"tau search: tau={10.0 ** log_tau:.4g} validation perplexity {mean:.3f}")
        return mean

    try:
        a, b = log_range
        c, d = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
        fc, fd = evaluate(c), evaluate(d)
        for _ in range(max(0, evaluations - 2)):
            if fc <= fd:
                b, d, fd = d, c, fc
                c = b - GOLDEN * (b - a)
                fc = evaluate(c)
            else:
                a, c, fc = c, d, fd
                d = a + GOLDEN * (b - a)
                fd = evaluate(d)
        best = min(tried, key=lambda t: tried[t]["val_perplexity"])
        chosen = tried[best]
        if refit and chosen["warm_start_from"] is not None:
            ws.store = work / "refit"
            if progress:
                print(f"tau search: chose tau={chosen['tau']:.4g}; training it from scratch ({steps} steps)")
            report = ws.train(tau=chosen["tau"], steps=steps, progress=progress, fit_router=False)
            chosen = {**chosen, "store": ws.store, "report": report}
        old = final_store.parent / f".{final_store.name}.old"
        if final_store.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final_store, old)
        os.replace(chosen["store"], final_store)
        shutil.rmtree(old, ignore_errors=True)
        state = store_mod.read_state(final_store)
        state["metrics"]["tau_search"] = {
            "method": "golden-section over log10(tau) on mean validation perplexity, warm starts",
            "chosen_tau": chosen["tau"],
            "refit_from_scratch": bool(refit and chosen["warm_start_from"] is not None),
            "tried": [{k: v for k, v in tried[t].items() if k not in ("store", "report")} for t in sorted(tried)],
        }
        atomic_write_text(final_store / store_mod.HUB_FILE, json.dumps(state, indent=2))
        if fit_router:
            from . import router as router_mod

            mtm, _ = ws.trained_model()
            router_mod.fit_and_save(ws, mtm, progress=progress)
        return chosen["report"]
    finally:
        ws.store = final_store
        shutil.rmtree(work, ignore_errors=True)
