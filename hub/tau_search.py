"""`tau: search`: choose the prior precision on the validation split, without a hand-made grid.

MAP over tau jointly with the adapters collapses (tau -> infinity, every theta_t -> Theta), so tau is chosen
by held-out evidence instead: a one-dimensional search over log10(tau) in [LOG_LO, LOG_HI] that minimises the
mean validation perplexity. Every candidate is trained from scratch with the full step budget and the same
seed, so candidates differ only in tau (an earlier version warm-started later candidates from the nearest
trained one with half the budget; those runs had a different training history from the first one, and the
search then compared unlike things: docs/bora.md). The search starts with two golden-section points, steps
into the wider side of the best point while it lies at the edge of the points tried, and otherwise jumps to
the vertex of the parabola through the best point and its two neighbours (successive parabolic
interpolation, as in Brent's method), which on a smooth valley lands near the minimum in a few runs.
The best candidate's store becomes the hub's store, and the search history is recorded in hub.json under
metrics.tau_search.
"""
from __future__ import annotations

import math
import shutil

from tasks.atomic import replace_dir, temp_dir_beside
from tasks.registry import ConfigError

from . import store as store_mod

# tau from 0.01 (nearly independent tasks) to 1e4: on SmolLM2 + BBC News, at tau = 1e4 the offsets theta_t - Theta
# are ~0.2% of Theta's size (docs/bora.md), i.e. already one shared adapter
LOG_LO, LOG_HI = -2.0, 4.0
EVALUATIONS = 4  # training runs
GOLDEN = (math.sqrt(5) - 1) / 2
MIN_GAP = 0.05  # decades: a proposal closer than this to a tried point takes a golden step instead


def propose(tried: dict[float, float], lo: float, hi: float) -> float:
    """The next log10(tau) to try, given {log10 tau: validation perplexity} (at least one point)."""
    xs = sorted(tried)
    k = min(range(len(xs)), key=lambda i: tried[xs[i]])
    x = xs[k]
    left = xs[k - 1] if k > 0 else lo
    right = xs[k + 1] if k + 1 < len(xs) else hi
    if 0 < k < len(xs) - 1:  # the best point has tried neighbours on both sides: parabola vertex
        f0, f1, f2 = tried[left], tried[x], tried[right]
        num = (x - left) ** 2 * (f1 - f2) - (x - right) ** 2 * (f1 - f0)
        den = (x - left) * (f1 - f2) - (x - right) * (f1 - f0)
        if den != 0:
            v = x - 0.5 * num / den
            if left < v < right and min(abs(v - t) for t in xs) > MIN_GAP:
                return v
    if right - x >= x - left:
        return x + (1 - GOLDEN) * (right - x)
    return x - (1 - GOLDEN) * (x - left)


def search_tau(ws, names=None, steps: int | None = None, progress: bool = True, fit_router: bool = True,
               evaluations: int = EVALUATIONS, log_range: tuple[float, float] = (LOG_LO, LOG_HI), on_step=None):
    """Train at the tau with the best mean validation perplexity; returns that run's TrainReport."""
    if names:
        raise ConfigError(["--tasks: tau 'search' searches tau for the whole hub; give a number to train a subset"],
                          ws.config_path)
    final_store, steps = ws.store, steps or ws.cfg.training.steps
    store_mod.check_target(final_store)
    work = temp_dir_beside(final_store)
    tried: dict[float, dict] = {}

    def evaluate(log_tau: float) -> None:
        log_tau = round(log_tau, 4)
        if log_tau in tried:
            return
        ws.store = work / f"tau-{log_tau:+.4f}"
        report = ws.train(tau=10.0 ** log_tau, steps=steps, progress=progress, fit_router=False, on_step=on_step)
        res = ws.evaluate(split="validation")
        mean = sum(r["perplexity"] for r in res.values()) / len(res)
        tried[log_tau] = {"tau": 10.0 ** log_tau, "val_perplexity": mean, "store": ws.store, "steps": report.steps,
                          "report": report}
        if progress:
            print(f"tau search: tau={10.0 ** log_tau:.4g} validation perplexity {mean:.3f}")

    try:
        lo, hi = log_range
        evaluate(hi - GOLDEN * (hi - lo))
        for _ in range(max(0, evaluations - 1)):
            evaluate(propose({t: r["val_perplexity"] for t, r in tried.items()}, lo, hi))
        chosen = tried[min(tried, key=lambda t: tried[t]["val_perplexity"])]
        store_mod.add_metrics(chosen["store"], tau_search={
            "method": "log10(tau) search on mean validation perplexity: golden-section start, then parabolic "
                      "interpolation; every candidate trained from scratch with the full budget",
            "range_log10": [lo, hi],
            "chosen_tau": chosen["tau"],
            "tried": [{k: v for k, v in tried[t].items() if k not in ("store", "report")} for t in tried],
        })
        store_mod.check_target(final_store)
        replace_dir(chosen["store"], final_store)
        if fit_router:
            from . import router as router_mod

            mtm, _ = ws.trained_model()
            router_mod.fit_and_save(ws, mtm, progress=progress)
        return chosen["report"]
    finally:
        ws.store = final_store
        shutil.rmtree(work, ignore_errors=True)
