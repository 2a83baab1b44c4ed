"""bench/variants.py: its registries are each variant at its defaults, its runs measure what the report states, and
the summary's ratios and goals are computed from the seeds' runs."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import variants  # noqa: E402
import variants_report  # noqa: E402

from hub.workspace import Workspace  # noqa: E402


def fake_run(ppl: float, base: float = 50.0, step: float = 1.0, acc: float | None = None) -> dict:
    run = {"perplexity": {"a": ppl, "b": ppl}, "base_perplexity": {"a": base, "b": base}, "step_seconds": step,
           "trainable_per_task": 1000 if acc is None else 5, "peak_memory_mb": 100.0, "curve": [[1, 60.0], [2, ppl]]}
    if acc is not None:
        run["accuracy"] = {"a": acc, "b": acc}
    return run


def test_summary_ratios_gain_share_and_goals():
    runs = {"lora": {0: fake_run(30.0), 1: fake_run(40.0)},
            "moslora": {0: fake_run(30.3, step=1.5), 1: fake_run(40.0, step=1.5)},  # +1% and 0%: within 2%
            "lora+gmt": {0: fake_run(33.0), 1: fake_run(44.0)},  # +10%
            "svfit": {0: fake_run(50 * (30 / 50) ** 0.3, acc=0.5),  # 30% of LoRA's NLL gain, then 60%
                      1: fake_run(50 * (40 / 50) ** 0.6, acc=0.7)}}
    s = variants.summarise(runs)
    assert s["moslora"]["vs_lora"]["mean"] == pytest.approx(0.005)
    assert s["moslora"]["step_time_vs_lora"]["mean"] == pytest.approx(1.5)
    assert s["lora+gmt"]["vs_lora"]["values"] == pytest.approx([0.1, 0.1])
    assert s["svfit"]["share_of_lora_gain"]["values"] == pytest.approx([0.3, 0.6])
    assert s["svfit"]["trainable_vs_lora"] == pytest.approx(0.005)
    assert s["svfit"]["accuracy"]["mean"] == pytest.approx(0.6) and "accuracy" not in s["lora"]
    g = variants.goals(s)
    assert g == {"moslora within 2% of LoRA": True, "lora+gmt within 2% of LoRA": False,
                 "svfit closes >= 30% of LoRA's gain with < 1% of its parameters": True}


def test_registries_are_the_variants_at_their_defaults(tmp_path):
    for variant, (adapter, extra) in variants.VARIANTS.items():
        for data in ("bbc", "hwu64"):
            ws = Workspace(variants.registry(tmp_path / variant / data, data, variant, 1, variants.FULL, "x"))
            task = ws.cfg.tasks[0]
            assert ws.cfg.adapter_of(task).type == adapter["type"]
            assert ws.cfg.adapter_of(task).rank == 8  # the schema's default rank, not the bench's choice
            assert (task.hiddenkey is not None) == ("hiddenkey" in extra) and (task.gmt is not None) == ("gmt" in extra)
            assert ws.cfg.training.seed == 1
    hwu = Workspace(tmp_path / "lora" / "hwu64" / "tasks.yaml")
    assert hwu.cfg.task_names == variants.HWU_SCENARIOS
    example = hwu.data("calendar").test[0]
    assert example.prompt == example.raw + "\nIntent:" and example.completion.strip() in {"set", "query", "remove"}


def test_quick_bench_on_a_tiny_model_in_process(tiny_model_dir, tmp_path, one_thread, capsys):
    argv = ["--quick", "--data", "hwu64", "--variants", "lora,svfit", "--seeds", "0", "--base-model",
            str(tiny_model_dir), "--in-process", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    out = variants.main(argv)
    run = out["runs"]["hwu64"]["svfit"][0]
    assert [s for s, _ in run["curve"]] == [2, 4]  # validation perplexity every eval_every steps, and at the end
    assert set(run["accuracy"]) == set(variants.HWU_SCENARIOS) and all(0 <= a <= 1 for a in run["accuracy"].values())
    assert run["trainable_per_task"] < out["runs"]["hwu64"]["lora"][0]["trainable_per_task"]
    assert run["peak_memory_mb"] > 10 and run["step_seconds"] > 0
    assert not (tmp_path / "out").exists()  # a partial bench writes no report
    assert run["accuracy_on"] == variants.ACCURACY_ON
    # a second start reuses every finished run, and rescores a kept run whose accuracy was measured otherwise
    kept = tmp_path / "work" / "quick" / "hwu64" / "seed0" / "svfit" / "result.json"
    stale = json.loads(kept.read_text())
    stale["run"].update(accuracy={n: -1.0 for n in run["accuracy"]}, accuracy_on="40 requests")
    kept.write_text(json.dumps(stale))
    again = variants.main(argv)
    assert "reusing" in capsys.readouterr().err
    assert again["runs"] == out["runs"]
    # a bench in an empty work folder takes the runs of an earlier results file at the same settings
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps(out))
    taken = variants.main([*argv[:-4], "--work", str(tmp_path / "empty"), "--prior", str(prior)])
    assert "taken from the prior results" in capsys.readouterr().err
    assert taken["runs"]["hwu64"]["svfit"][0]["perplexity"] == run["perplexity"]
    assert not (tmp_path / "empty").exists()
    report = {**out, "runs": {"hwu64": out["runs"]["hwu64"], "bbc": out["runs"]["hwu64"]},
              "summary": {"hwu64": out["summary"]["hwu64"], "bbc": out["summary"]["hwu64"]},
              "goals": {"hwu64": out["goals"]["hwu64"], "bbc": out["goals"]["hwu64"]}}
    variants_report.write_report(report, tmp_path / "out")
    md = (tmp_path / "out" / "variants.md").read_text()
    assert md.count("| svfit |") == 2 and "label accuracy" in md
    assert (tmp_path / "out" / "variants_curves.png").stat().st_size > 5000
    assert json.loads((tmp_path / "out" / "variants.json").read_text())["seeds"] == [0]


def test_prior_runs_only_at_the_same_settings_and_spaced_rows():
    run = fake_run(30.0)
    prior = {"mode": variants.FULL, "tau": variants.TAU, "runs": {"bbc": {"moslora": {"2": run}}},
             "variants": {v: {"adapter": a, **e} for v, (a, e) in variants.VARIANTS.items()}}
    assert variants.from_prior(prior, "bbc", "moslora", 2, variants.FULL) == run
    assert variants.from_prior(prior, "bbc", "moslora", 1, variants.FULL) is None  # not in it
    assert variants.from_prior(prior, "bbc", "lora", 2, variants.FULL) is None
    other = {**variants.FULL, "bbc": {**variants.FULL["bbc"], "steps": 44}}
    assert variants.from_prior(prior, "bbc", "moslora", 2, other) is None  # another budget
    assert variants.from_prior({**prior, "tau": 1.0}, "bbc", "moslora", 2, variants.FULL) is None
    changed = {**prior, "variants": {**prior["variants"], "moslora": {"adapter": {"type": "moslora", "rank": 4}}}}
    assert variants.from_prior(changed, "bbc", "moslora", 2, variants.FULL) is None
    assert variants.spaced(100, 4) == [0, 25, 50, 75] and variants.spaced(3, 20) == [0, 1, 2]
