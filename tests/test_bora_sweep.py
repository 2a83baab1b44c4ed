"""The tau sweep's code path at tiny scale, and tau: auto."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bora_sweep  # noqa: E402

from hub.store import read_state  # noqa: E402
from hub.workspace import Workspace  # noqa: E402


def test_sweep_and_plots_at_tiny_scale(tiny_registry, tmp_path):
    result = bora_sweep.run_sweep(tiny_registry, [0, 10, "shared"], auto_evaluations=3)
    assert set(result["runs"]) == {"0", "10", "shared"}
    assert set(result["per_task"]) == {"cooking", "finance", "sport"}
    assert result["best_grid_tau"] == "10"  # the only middle value
    tried = result["auto"]["search"]["tried"]
    assert len(tried) == 3 and result["auto"]["tau"] == min(tried, key=lambda t: t["val_perplexity"])["tau"]
    # every candidate is a full-budget run at a different tau
    assert len({t["tau"] for t in tried}) == 3 and {t["steps"] for t in tried} == {6}
    # tau=0 and tau=shared really are different models
    assert result["runs"]["0"]["perplexity"] != result["runs"]["shared"]["perplexity"]
    result["auto"]["search"] = {}
    figs = bora_sweep.plot(result, tmp_path)
    assert all(Path(f).stat().st_size > 1000 for f in figs)
    json.dumps(result, default=str)
    md = bora_sweep.table(result | {"command": "x", "machine": "y", "date": "z"})
    assert md.count("\n| ") == 4 and "tau=shared" in md  # header + 3 tasks + mean


def test_tau_auto_in_the_registry_picks_and_records_a_tau(tiny_registry):
    cfg = yaml.safe_load(tiny_registry.read_text())
    cfg["prior"]["tau"] = "auto"
    tiny_registry.write_text(yaml.safe_dump(cfg))
    ws = Workspace(tiny_registry)
    from hub.tau_search import search_tau

    search_tau(ws, progress=False, fit_router=False, evaluations=2)
    state = read_state(ws.store)
    search = state["metrics"]["tau_search"]
    assert state["tau"] == search["chosen_tau"] and 0.01 <= state["tau"] <= 1e4
    assert len(search["tried"]) == 2
    assert state["metrics"]["steps"] == ws.cfg.training.steps  # the hub's adapters are a full-budget run
    assert not any(p.name.startswith(".tau-search") for p in ws.store.parent.iterdir())


def test_an_interrupted_sweep_reuses_finished_runs(tiny_registry, capsys):
    first = bora_sweep.run_sweep(tiny_registry, [0, "shared"], auto_evaluations=0)
    assert set(first) == {"runs"}
    again = bora_sweep.run_sweep(tiny_registry, [0, "shared", 10], auto_evaluations=0)
    assert again["runs"]["0"] == first["runs"]["0"] and again["runs"]["shared"] == first["runs"]["shared"]
    assert capsys.readouterr().err.count("reusing the finished run") == 2
    cfg = yaml.safe_load(tiny_registry.read_text())
    cfg["training"]["seed"] = 7  # another registry: nothing is reused
    tiny_registry.write_text(yaml.safe_dump(cfg))
    bora_sweep.run_sweep(tiny_registry, [0], auto_evaluations=0)
    assert "reusing" not in capsys.readouterr().err


def test_search_proposals_find_the_valley_of_a_smooth_curve():
    from hub.tau_search import GOLDEN, propose

    f = lambda x: 30 + (x - 2.0) ** 2  # noqa: E731  (validation perplexity against log10 tau)
    start = 4 - GOLDEN * 6
    tried = {start: f(start)}
    assert propose(tried, -2, 4) == pytest.approx(start + (1 - GOLDEN) * (4 - start))  # golden step, wider side
    for _ in range(3):
        x = propose(tried, -2, 4)
        tried[x] = f(x)
    assert min(tried, key=tried.get) == pytest.approx(2.0, abs=1e-6)  # a parabola through a parabola is exact
