"""The tau sweep's code path at tiny scale (grid, tau auto in one run, tau search, seed means), HWU64 tasks."""
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
    result = bora_sweep.run_sweep(tiny_registry, [0, 10, "shared"], search_evaluations=2)
    assert set(result["runs"]) == {"0", "10", "shared", "auto"}
    summary = bora_sweep.summarise(result["runs"])
    assert set(summary["per_task"]) == {"cooking", "finance", "sport"}
    assert summary["best_grid_tau"] == "10"  # the only middle value
    assert isinstance(result["runs"]["auto"]["tau"], float) and result["runs"]["auto"]["tau_history"]
    assert summary["auto_time_vs_one_run"] > 0
    tried = result["search"]["search"]["tried"]
    assert len(tried) == 2 and result["search"]["tau"] == min(tried, key=lambda t: t["val_perplexity"])["tau"]
    assert len({t["tau"] for t in tried}) == 2 and {t["steps"] for t in tried} == {6}  # full-budget candidates
    # tau=0 and tau=shared really are different models
    assert result["runs"]["0"]["perplexity"] != result["runs"]["shared"]["perplexity"]
    per_seed = [{"seed": 0, **result, **summary}]
    report = {"data": "bbc", "per_seed": per_seed, **bora_sweep.across_seeds(per_seed),
              "command": "x", "machine": "y", "date": "z"}
    figs = bora_sweep.plot(report, tmp_path)
    assert all(Path(f).stat().st_size > 1000 for f in figs)
    json.dumps(report, default=str)
    md = bora_sweep.table(report)
    assert md.count("\n| ") == 5 and "tau=shared" in md and "tau auto" in md  # header + 3 tasks + mean


def test_seed_means_and_spread():
    def run(tau, a, b):
        return {"tau": tau, "n_train": {"x": 5, "y": 50}, "perplexity": {"x": a, "y": b}, "train_seconds": 10.0}

    seeds = [{"seed": s, "runs": {"0": run(0, 30 + s, 20), "10": run(10, 20, 10 + 2 * s),
                                  "shared": run("shared", 25, 15), "auto": run(7.0 + s, 21, 11)}} for s in (0, 1)]
    agg = bora_sweep.across_seeds(seeds)
    assert agg["runs"]["0"]["perplexity"] == {"x": 30.5, "y": 20}
    assert agg["mean_perplexity_spread"]["0"] == pytest.approx(0.25) and agg["mean_perplexity_spread"]["shared"] == 0
    assert agg["best_grid_tau"] == "10" and agg["best_beats_both_on_every_task"]
    assert agg["mean_gain_vs_better_extreme"] == pytest.approx(1 - 15.5 / 20)
    assert agg["auto_vs_best_grid"] == pytest.approx(16 / 15.5 - 1) and agg["runs"]["auto"]["tau"] == [7.0, 8.0]


def test_hwu64_registry_has_unequal_scenario_tasks(tmp_path):
    from tasks.registry import load_config

    cfg_path = bora_sweep.hwu_registry(tmp_path, bora_sweep.QUICK, 0)
    cfg = load_config(cfg_path)
    assert [t.name for t in cfg.tasks] == list(bora_sweep.HWU_SIZES)
    ws = Workspace(cfg_path)
    sizes = {n: len(ws.data(n).train) for n in cfg.task_names}
    assert sizes == bora_sweep.HWU_SIZES and all(ws.data(n).test for n in cfg.task_names)


def test_tau_search_in_the_registry_picks_and_records_a_tau(tiny_registry):
    cfg = yaml.safe_load(tiny_registry.read_text())
    cfg["prior"]["tau"] = "search"
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
    first = bora_sweep.run_sweep(tiny_registry, [0, "shared"])
    assert set(first) == {"runs"} and set(first["runs"]) == {"0", "shared", "auto"}
    again = bora_sweep.run_sweep(tiny_registry, [0, "shared", 10])
    assert again["runs"]["0"] == first["runs"]["0"] and again["runs"]["auto"] == first["runs"]["auto"]
    assert capsys.readouterr().err.count("reusing the finished run") == 3
    cfg = yaml.safe_load(tiny_registry.read_text())
    cfg["training"]["seed"] = 7  # another registry: nothing is reused
    tiny_registry.write_text(yaml.safe_dump(cfg))
    bora_sweep.run_sweep(tiny_registry, [0])
    assert "reusing" not in capsys.readouterr().err
    grid_only = bora_sweep.run_sweep(tiny_registry, [0, "shared"], auto=False)  # --no-auto
    assert set(grid_only["runs"]) == {"0", "shared"}
    assert "auto_vs_best_grid" not in bora_sweep.summarise(grid_only["runs"])


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


def test_finished_runs_are_reused_on_the_same_registry_and_code_or_fixed_taus_on_request():
    kept = {"registry": "cfg-text" + "ab" * 8}
    assert bora_sweep.reusable(kept, 10.0, "cfg-text", "cfg-text" + "ab" * 8, reuse_grid=False)
    assert not bora_sweep.reusable(kept, 10.0, "cfg-text", "cfg-text" + "cd" * 8, reuse_grid=False)  # code changed
    assert bora_sweep.reusable(kept, 10.0, "cfg-text", "cfg-text" + "cd" * 8, reuse_grid=True)
    assert not bora_sweep.reusable(kept, "auto", "cfg-text", "cfg-text" + "cd" * 8, reuse_grid=True)  # auto reruns
    assert not bora_sweep.reusable(kept, 10.0, "other-registry", "other-registry", reuse_grid=True)
    assert not bora_sweep.reusable({}, 10.0, "cfg-text", "cfg-text", reuse_grid=True)


def test_lr_and_clipping_overrides_enter_the_registry_only_when_given(tmp_path):
    from tasks.registry import load_config

    for d in "abc":
        (tmp_path / d).mkdir()
    plain = load_config(bora_sweep.bbc_registry(tmp_path / "a", bora_sweep.QUICK, 0)).training
    assert plain.lr == 3e-3 and plain.max_grad_norm is None
    assert "max_grad_norm" not in (tmp_path / "a" / "tasks.yaml").read_text()  # kept runs stay reusable
    mode = {**bora_sweep.QUICK, "lr": 1e-3, "max_grad_norm": 2.0}
    assert load_config(bora_sweep.hwu_registry(tmp_path / "b", mode, 0)).training.max_grad_norm == 2.0
    clipped = load_config(bora_sweep.bbc_registry(tmp_path / "c", mode, 0)).training
    assert (clipped.lr, clipped.max_grad_norm) == (1e-3, 2.0)
    longer = load_config(bora_sweep.bbc_registry(tmp_path / "a", {**bora_sweep.QUICK, "steps": 9}, 0)).training
    assert longer.steps == 9  # --steps


def test_grad_norm_trace_reads_every_step_and_clips_only_when_asked(tiny_registry):
    import grad_norms

    plain = grad_norms.trace(tiny_registry, tau=5.0)
    steps = Workspace(tiny_registry).cfg.training.steps
    assert [s["step"] for s in plain["steps"]] == list(range(1, steps + 1))
    assert all(s["grad_norm"] > 0 for s in plain["steps"]) and plain["clipped_steps"] == 0
    clipped = grad_norms.trace(tiny_registry, tau=5.0, max_grad_norm=1e-6)
    assert clipped["clipped_steps"] == steps
    assert [s["grad_norm"] for s in clipped["steps"]][0] == pytest.approx(plain["steps"][0]["grad_norm"], rel=1e-5)
    assert clipped["perplexity"] != plain["perplexity"]


def test_prior_results_give_their_fixed_tau_runs_at_the_same_settings(tiny_registry, capsys):
    run = {"tau": 0.0, "code": "abc", "perplexity": {"a": 9.0}, "n_train": {"a": 3}}
    prior = {"data": "bbc", "settings": {**bora_sweep.FULL, "grid": [0, "shared"]},
             "per_seed": [{"seed": 1, "runs": {"0": run, "auto": {**run, "tau": 3.0}}}]}
    taken = bora_sweep.prior_runs(prior, "bbc", {**bora_sweep.FULL, "grid": [0, 10]}, 1)
    assert taken == {"0": run}  # auto always reruns; another grid is fine
    assert bora_sweep.prior_runs(prior, "bbc", bora_sweep.FULL, 0) == {}
    assert bora_sweep.prior_runs(prior, "hwu64", bora_sweep.FULL, 1) == {}
    assert bora_sweep.prior_runs(prior, "bbc", {**bora_sweep.FULL, "lr": 1e-3}, 1) == {}
    assert bora_sweep.prior_runs(prior, "bbc", {**bora_sweep.FULL, "steps": 180}, 1) == {}
    out = bora_sweep.run_sweep(tiny_registry, [0], earlier=taken)
    assert out["runs"]["0"] == run and "taken from the prior results" in capsys.readouterr().err
    assert set(out["runs"]) == {"0", "auto"}
