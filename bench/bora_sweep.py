"""BoRA's central claim on real data: a middle tau beats both extremes (tau=0 and tau=shared).

Tasks with unequal training sizes (the rest held out), trained jointly at every tau of a grid with the same
budget and seed, plus `tau: auto` (learned in one run, models/tau_heldout.py) and optionally `tau: search` (chosen
on validation over several runs); per-task held-out (test) perplexity for each, for every seed, and the seed
mean with its spread. Data: BBC News topics (documents) or HWU64 scenarios (short requests), 25-400 training
examples per task. Writes docs/results/bora_<data>.json and .md, and two PNGs (perplexity vs tau, every seed;
improvement vs data size).

    python bench/bora_sweep.py --data bbc --seeds 0,1,2     # full mode
    python bench/bora_sweep.py --quick                      # CI-sized: fewer steps, shorter texts, a 3-point grid
"""
from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hub.store import read_state  # noqa: E402
from hub.workspace import Workspace  # noqa: E402

SIZES = {"sports": 25, "politics": 50, "tech": 100, "entertainment": 200, "business": 400}
HWU_SIZES = {"calendar": 25, "email": 50, "transport": 100, "play": 200, "iot": 400}  # scenarios with enough data
FULL = {"grid": [0, 0.1, 1, 10, 100, 1000, "shared"], "steps": 60, "batch_size": 8, "max_length": 64,
        "eval_docs": 40, "sampling": "balanced", "search_evaluations": 0}
QUICK = {"grid": [0, 1, "shared"], "steps": 6, "batch_size": 4, "max_length": 32, "eval_docs": 6,
         "sampling": "balanced", "search_evaluations": 0}
HWU_MAX_LENGTH = 32  # requests are ~10 tokens
HWU_LR = 5e-4  # 8 requests of ~10 tokens per step are ~1/6 of BBC's tokens. At BBC's 3e-3 single tasks' test
# perplexity jumped 10-30x at some tau; at 1e-3 about one middle-tau run in six still diverged, clipped or not
# (docs/results/hwu64_divergence.json); at 5e-4 none of 18 did (docs/bora.md)


def training(mode: dict, seed: int, max_length: int, lr: float = 0.003) -> dict:
    """The runs' training settings; ``mode`` may override the data set's lr and set max_grad_norm (--lr,
    --max-grad-norm), which otherwise stay out of the registry (its text keys the kept runs)."""
    out = {"steps": mode["steps"], "batch_size": mode["batch_size"], "max_length": max_length,
           "lr": mode.get("lr") or lr, "lr_schedule": "cosine", "checkpoint_every": 10 ** 6,
           "eval_docs": mode["eval_docs"], "seed": seed, "sampling": mode["sampling"]}
    return {**out, "max_grad_norm": mode["max_grad_norm"]} if mode.get("max_grad_norm") else out


def bbc_registry(work: Path, mode: dict, seed: int) -> Path:
    cfg = {
        "base_model": "smollm2-135m", "store": "store", "prior": {"tau": 1.0},
        "training": training(mode, seed, mode["max_length"]),
        "tasks": [{"name": n, "data": {"bbc_news": n, "max_train": k, "validation": 0.1, "test": 0.1}}
                  for n, k in SIZES.items()],
    }
    path = work / "tasks.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def hwu_registry(work: Path, mode: dict, seed: int) -> Path:
    """HWU64 scenarios as tasks (each request a document), subsampled to unequal training sizes."""
    with (ROOT.parent / "shared" / "data" / "hwu64" / "train.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    tasks = []
    for name, k in HWU_SIZES.items():
        path = work / f"hwu64-{name}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text"])
            w.writerows([r["text"]] for r in rows if r["scenario"] == name)
        tasks.append({"name": name, "data": {"path": path.name, "max_train": k, "validation": 0.1, "test": 0.1}})
    cfg = {"base_model": "smollm2-135m", "store": "store", "prior": {"tau": 1.0},
           "training": training(mode, seed, min(mode["max_length"], HWU_MAX_LENGTH), HWU_LR), "tasks": tasks}
    path = work / "tasks.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


REGISTRIES = {"bbc": (bbc_registry, SIZES), "hwu64": (hwu_registry, HWU_SIZES)}


def tau_label(tau) -> str:
    return tau if tau in ("shared", "auto") else f"{tau:g}"


def code_version() -> str:
    """The commit the runs' code is at (with "+changes" when the work tree differs from it)."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    changed = "+changes" if git("status", "--porcelain", "models") else ""
    return (git("rev-parse", "--short", "HEAD") or "unknown") + changed


def reusable(kept: dict, tau, config_text: str, settings: str, reuse_grid: bool) -> bool:
    """A finished run is reused when it ran on this registry and this code; with ``reuse_grid`` a fixed-tau run
    (not auto) of this registry is reused whatever code it ran at (its record says which: ``code``), for when
    only tau auto's code changed."""
    if kept.get("registry") == settings:
        return True
    return reuse_grid and tau != "auto" and str(kept.get("registry", "")).startswith(config_text)


def prior_runs(prior: dict | None, data: str, mode: dict, seed: int) -> dict:
    """The fixed-tau runs (not auto) of an earlier results file (``--prior``) for ``seed``, when that sweep ran this
    data set at the same settings (its grid aside); {} otherwise. Lets a sweep go on in another checkout."""
    same = lambda m: {k: v for k, v in m.items() if k != "grid"}  # noqa: E731
    if not prior or prior.get("data") != data or same(prior.get("settings", {})) != same(mode):
        return {}
    runs = next((s["runs"] for s in prior.get("per_seed", []) if s.get("seed") == seed), {})
    return {k: r for k, r in runs.items() if k != "auto"}


def run_sweep(config: Path, grid: list, search_evaluations: int = 0, progress: bool = False,
              reuse_grid: bool = False, earlier: dict | None = None, auto: bool = True) -> dict:
    """Train + test-evaluate at every tau of the grid, then with tau auto (one run) unless not ``auto``, and with
    tau search if ``search_evaluations``; returns {"runs": {label: run}, "search": ...}.

    Each finished run (auto included) is kept in <work>/runs/<tau>.json with the registry it ran on (and a hash of
    the code under models/), and reused when the sweep is started again on the same registry and code (an
    interrupted sweep loses at most the run in progress). ``earlier``: fixed-tau runs to take as they are, by label
    (``prior_runs``)."""
    ws = Workspace(config)
    root = ws.store
    code = sorted((ROOT / "models").glob("*.py"))  # every file a run's numbers rest on
    config_text = config.read_text()
    settings = config_text + "".join(hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in code)
    runs = {}
    for tau in [*grid, *(["auto"] if auto else [])]:
        done = root.parent / "runs" / f"{tau_label(tau)}.json"
        kept = json.loads(done.read_text()) if done.exists() else {}
        if tau != "auto" and tau_label(tau) in (earlier or {}):
            runs[tau_label(tau)] = earlier[tau_label(tau)]
            print(f"tau={tau_label(tau)}: taken from the prior results (code {runs[tau_label(tau)].get('code')})",
                  file=sys.stderr)
            continue
        if reusable(kept, tau, config_text, settings, reuse_grid):
            runs[tau_label(tau)] = {"code": "before 2026-12-02 (not recorded)", **kept["run"]}
            print(f"tau={tau_label(tau)}: reusing the finished run in {done} (code {runs[tau_label(tau)]['code']})",
                  file=sys.stderr)
            continue
        ws.store = root.parent / f"store-tau-{tau_label(tau)}"
        t0 = time.perf_counter()
        report = ws.train(tau=tau, progress=progress, fit_router=False)
        res = ws.evaluate(split="test")
        runs[tau_label(tau)] = {"tau": report.tau, "code": code_version(), "seconds": time.perf_counter() - t0,
                                "train_seconds": report.seconds, "clipped_steps": report.clipped_steps,
                                "perplexity": {n: r["perplexity"] for n, r in res.items()},
                                "base_perplexity": {n: r["base_perplexity"] for n, r in res.items()},
                                "n_train": {n: r["n_train"] for n, r in res.items()}}
        if tau == "auto":
            runs["auto"]["tau_history"] = report.tau_history
            runs["auto"]["method"] = read_state(ws.store)["metrics"]["tau_auto"]["method"]
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"registry": settings, "run": runs[tau_label(tau)]}, indent=2))
        if progress:
            print(f"tau={tau_label(tau)}: " + json.dumps(runs[tau_label(tau)]["perplexity"]), file=sys.stderr)
    out = {"runs": runs}
    if search_evaluations:
        from hub.tau_search import search_tau

        ws.store = root.parent / "store-tau-search"
        t0 = time.perf_counter()
        search_tau(ws, progress=progress, fit_router=False, evaluations=search_evaluations)
        res = ws.evaluate(split="test")
        out["search"] = {"tau": read_state(ws.store)["metrics"]["tau_search"]["chosen_tau"],
                         "seconds": time.perf_counter() - t0,
                         "search": read_state(ws.store)["metrics"]["tau_search"],
                         "perplexity": {n: r["perplexity"] for n, r in res.items()}}
    ws.store = root
    return out


def mean(d: dict) -> float:
    return sum(d.values()) / len(d)


def summarise(runs: dict) -> dict:
    """The claim's figures for one set of runs (one seed, or the seed mean): the best middle tau of the grid,
    whether it beats both extremes on every task, by how much, and where tau auto lands."""
    grid = {k: r for k, r in runs.items() if k != "auto"}
    means = {k: mean(r["perplexity"]) for k, r in runs.items()}
    middle = {k: means[k] for k in grid if k not in ("0", "shared")}
    best = min(middle, key=middle.get) if middle else min(grid, key=means.get)
    per_task = {}
    for t in runs[best]["perplexity"]:
        p_best, p0, ps = runs[best]["perplexity"][t], runs["0"]["perplexity"][t], runs["shared"]["perplexity"][t]
        per_task[t] = {"n_train": runs[best]["n_train"][t], "best_tau": p_best, "tau_0": p0, "shared": ps,
                       "beats_both": p_best < p0 and p_best < ps,
                       "gain_vs_better_extreme": 1 - p_best / min(p0, ps),
                       "gain_vs_tau_0": 1 - p_best / p0, "gain_vs_shared": 1 - p_best / ps}
    out = {
        "mean_perplexity": means, "best_grid_tau": best,
        "best_beats_both_on_every_task": all(v["beats_both"] for v in per_task.values()),
        "mean_gain_vs_better_extreme": 1 - means[best] / min(means["0"], means["shared"]),
        "per_task": per_task,
    }
    if "auto" in runs:
        grid_s = [r["train_seconds"] for k, r in grid.items() if "train_seconds" in r]
        out |= {"auto_mean_perplexity": means["auto"], "auto_vs_best_grid": means["auto"] / means[best] - 1,
                "auto_time_vs_one_run": runs["auto"]["train_seconds"] / statistics.median(grid_s) if grid_s else None}
    return out


def across_seeds(per_seed: list[dict]) -> dict:
    """Runs averaged over seeds (per task and tau), summarised as one; plus each tau's spread over seeds."""
    labels = [k for k in per_seed[0]["runs"] if all(k in s["runs"] for s in per_seed)]
    avg = {}
    for k in labels:
        first = per_seed[0]["runs"][k]
        avg[k] = {"tau": [s["runs"][k]["tau"] for s in per_seed], "n_train": first["n_train"],
                  "perplexity": {t: statistics.mean(s["runs"][k]["perplexity"][t] for s in per_seed)
                                 for t in first["perplexity"]}}
        if "train_seconds" in first:
            avg[k]["train_seconds"] = statistics.mean(s["runs"][k]["train_seconds"] for s in per_seed)
    spread = {k: statistics.pstdev([mean(s["runs"][k]["perplexity"]) for s in per_seed]) for k in labels}
    return {"runs": avg, "mean_perplexity_spread": spread, **summarise(avg)}


def plot(result: dict, out_dir: Path) -> list[str]:
    """Mean perplexity vs tau for every seed (thin) and their mean (thick), with each task's seed mean; and the
    best tau's gain per task against its data size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data, runs = result["data"], result["runs"]
    labels = [k for k in runs if k != "auto"]
    finite = [float(k) for k in labels if k not in ("0", "shared")]
    lo, hi = (min(finite), max(finite)) if finite else (1.0, 10.0)
    xs = {k: lo / 10 if k == "0" else hi * 10 if k == "shared" else float(k) for k in labels}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tasks = list(runs[labels[0]]["perplexity"])
    for t in tasks:
        ax.plot([xs[k] for k in labels], [runs[k]["perplexity"][t] for k in labels], marker="o", alpha=0.5,
                label=f"{t} (n={runs[labels[0]]['n_train'][t]}), seed mean")
    for seed in result["per_seed"]:
        ax.plot([xs[k] for k in labels], [mean(seed["runs"][k]["perplexity"]) for k in labels], color="black",
                linewidth=1, alpha=0.6, linestyle=":")
    ax.plot([xs[k] for k in labels], [result["mean_perplexity"][k] for k in labels], color="black", linewidth=3,
            marker="o", label=f"mean over tasks (seed mean; dotted: each of {len(result['per_seed'])} seeds)")
    if "auto" in runs:
        ax.axhline(result["mean_perplexity"]["auto"], color="gray", linestyle="--", label="tau auto (one run), mean")
    ax.set_xscale("log")
    ax.set_xticks([xs[k] for k in labels], [("0" if k == "0" else "∞ (shared)" if k == "shared" else k)
                                            for k in labels])
    ax.set_xlabel("tau (prior precision)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"BoRA on {TITLES[data]} (SmolLM2-135M)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    p1 = out_dir / f"bora_{data}_tau.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    pt = result["per_task"]
    ns = [pt[t]["n_train"] for t in tasks]
    ax.plot(ns, [100 * pt[t]["gain_vs_tau_0"] for t in tasks], marker="o", label="vs tau=0 (independent)")
    ax.plot(ns, [100 * pt[t]["gain_vs_shared"] for t in tasks], marker="s", label="vs shared adapter")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("training examples of the task")
    ax.set_ylabel(f"perplexity reduction at tau={result['best_grid_tau']} (%)")
    ax.legend()
    fig.tight_layout()
    p2 = out_dir / f"bora_{data}_gain.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [str(p1), str(p2)]


TITLES = {"bbc": "BBC News topics", "hwu64": "HWU64 scenarios"}
PAPER = "OPT-350m, Talk of Norway, 25 speakers: tau=0 16.80, best tau 12.82, largest tau 13.91"


def table(result: dict) -> str:
    """The reproduction table (markdown) of the seed means, generated from the results mapping."""
    runs, seeds = result["runs"], result["per_seed"]
    labels = [k for k in runs if k != "auto"]
    best = result["best_grid_tau"]
    auto = "auto" in runs
    head = "| task | train | " + " | ".join(f"tau={k}" for k in labels) + (" | tau auto" if auto else "") + \
        " | best beats both |"
    lines = [f"Seed mean of {len(seeds)} seed(s) ({', '.join(str(s['seed']) for s in seeds)}); held-out perplexity.",
             "", head, "|" + "---|" * (len(labels) + 3 + auto)]
    for t, row in result["per_task"].items():
        cells = [f"{runs[k]['perplexity'][t]:.2f}" for k in labels] + ([f"{runs['auto']['perplexity'][t]:.2f}"]
                                                                       if auto else [])
        verdict = "yes" if row["beats_both"] else "no"
        lines.append(f"| {t} | {row['n_train']} | " + " | ".join(cells) + f" | {verdict} |")
    spread = result["mean_perplexity_spread"]
    lines.append("| **mean** (± seed spread) | | " + " | ".join(
        f"**{result['mean_perplexity'][k]:.2f}** ± {spread[k]:.2f}" for k in [*labels, *(["auto"] if auto else [])])
        + " | |")
    lines += ["", f"Best grid tau on the seed mean: **{best}**; it beats both extremes on every task: "
              f"**{'yes' if result['best_beats_both_on_every_task'] else 'no'}**; mean gain over the better extreme: "
              f"**{100 * result['mean_gain_vs_better_extreme']:.2f}%** (per seed: " +
              ", ".join(f"{100 * s['mean_gain_vs_better_extreme']:.2f}% at tau={s['best_grid_tau']}" for s in seeds)
              + ")."]
    if auto:
        method = seeds[0]["runs"]["auto"].get("method", "evidence update (models/tau_eb.py)")
        taus = ", ".join(f"{t:.3g}" for t in runs["auto"]["tau"])
        lines.append(f"`tau: auto` (one run; {method}) learned tau = {taus}; "
                     f"mean perplexity {100 * result['auto_vs_best_grid']:+.2f}% vs the best grid tau (per seed: "
                     + ", ".join(f"{100 * s['auto_vs_best_grid']:+.2f}%" for s in seeds) + "), in "
                     f"{result['auto_time_vs_one_run']:.2f}x the training time of a grid run (median over the grid).")
    lines += [f"Paper ({PAPER}).",
              f"Command: `{result['command']}`; {result['machine']}; {result['date']}."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", choices=sorted(REGISTRIES), default="bbc")
    ap.add_argument("--quick", action="store_true", help="CI-sized run (minutes)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--grid", default=None, help="comma-separated taus instead of the mode's grid, e.g. 0,100,shared")
    ap.add_argument("--search", type=int, default=0, metavar="N", help="also run tau: search with N candidate runs")
    ap.add_argument("--no-auto", action="store_true", help="the grid only (no tau: auto run)")
    ap.add_argument("--work", default=None, help="scratch folder for the runs' stores (default .borahub/bora_sweep)")
    ap.add_argument("--reuse-grid", action="store_true",
                    help="reuse finished fixed-tau runs of this registry although models/ changed (auto reruns)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (default: 3e-3 on bbc, 1e-3 on hwu64)")
    ap.add_argument("--max-grad-norm", type=float, default=None, help="clip the gradient norm (default: off)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: the mode's)")
    ap.add_argument("--prior", type=Path, default=None,
                    help="an earlier results JSON: its fixed-tau runs of the same data and settings are taken")
    ap.add_argument("--out", default=None, help="results folder (default docs/results; --quick: the work folder)")
    args = ap.parse_args()
    mode = dict(QUICK if args.quick else FULL)
    if args.grid:
        mode["grid"] = [t if t == "shared" else float(t) for t in args.grid.split(",")]
    try:
        prior = json.loads(args.prior.read_text()) if args.prior else None
    except (OSError, ValueError) as e:
        ap.error(f"--prior {args.prior}: {e}")
    mode.update({k: v for k, v in (("lr", args.lr), ("max_grad_norm", args.max_grad_norm), ("steps", args.steps))
                 if v is not None})
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work or ".borahub/bora_sweep") / (args.data + ("-quick" if args.quick else ""))
    out_dir = Path(args.out or (work if args.quick else ROOT / "docs" / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    registry, sizes = REGISTRIES[args.data]
    t0, per_seed = time.perf_counter(), []
    for seed in [int(x) for x in args.seeds.split(",")]:
        folder = work / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        res = run_sweep(registry(folder, mode, seed), mode["grid"], args.search, progress=True,
                        reuse_grid=args.reuse_grid, earlier=prior_runs(prior, args.data, mode, seed),
                        auto=not args.no_auto)
        per_seed.append({"seed": seed, **res, **summarise(res["runs"])})
    import torch

    result = {"command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, " + (torch.cuda.get_device_name() if torch.cuda.is_available()
                                                      else f"cpu ({os.cpu_count()} cores)"),
              "data": args.data, "mode": "quick" if args.quick else "full", "settings": mode,
              "seeds": [s["seed"] for s in per_seed], "task_sizes": sizes, "per_seed": per_seed,
              **across_seeds(per_seed), "total_seconds": time.perf_counter() - t0}
    result["figures"] = [Path(f).name for f in plot(result, out_dir)]  # beside the results file
    (out_dir / f"bora_{args.data}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / f"bora_{args.data}.md").write_text(f"# BoRA tau sweep on {TITLES[args.data]}\n\n" + table(result) + "\n")
    print(json.dumps({k: result.get(k) for k in ("mean_perplexity", "mean_perplexity_spread", "best_grid_tau",
                                                 "best_beats_both_on_every_task", "mean_gain_vs_better_extreme",
                                                 "auto_vs_best_grid", "auto_time_vs_one_run", "total_seconds")},
                     indent=2))


if __name__ == "__main__":
    main()
