"""BoRA's central claim on real data: a middle tau beats both extremes (tau=0 and tau=shared).

BBC News topics as tasks with unequal training sizes (the rest held out), trained jointly at every tau of a
grid with the same budget and seed, plus `tau: auto`; per-task held-out (test) perplexity for each.
Writes docs/results/bora_bbc.json and two PNGs (perplexity vs tau; improvement vs data size).

    python bench/bora_sweep.py            # full mode
    python bench/bora_sweep.py --quick    # CI-sized: fewer steps, shorter texts, a 3-point grid
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub.workspace import Workspace  # noqa: E402

SIZES = {"sports": 25, "politics": 50, "tech": 100, "entertainment": 200, "business": 400}
FULL = {"grid": [0, 0.1, 1, 10, 100, 1000, "shared"], "steps": 60, "batch_size": 8, "max_length": 64,
        "eval_docs": 40, "sampling": "balanced", "auto_evaluations": 4}
QUICK = {"grid": [0, 1, "shared"], "steps": 6, "batch_size": 4, "max_length": 32, "eval_docs": 6,
         "sampling": "balanced", "auto_evaluations": 3}


def bbc_registry(work: Path, mode: dict, seed: int) -> Path:
    cfg = {
        "base_model": "smollm2-135m", "store": "store", "prior": {"tau": 1.0},
        "training": {"steps": mode["steps"], "batch_size": mode["batch_size"], "max_length": mode["max_length"],
                     "lr": 0.003, "lr_schedule": "cosine", "checkpoint_every": 10 ** 6, "eval_docs": mode["eval_docs"],
                     "seed": seed,
                     "sampling": mode["sampling"]},
        "tasks": [{"name": n, "data": {"bbc_news": n, "max_train": k, "validation": 0.1, "test": 0.1}}
                  for n, k in SIZES.items()],
    }
    path = work / "tasks.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def tau_label(tau) -> str:
    return "shared" if tau == "shared" else f"{tau:g}"


def run_sweep(config: Path, grid: list, auto_evaluations: int, progress: bool = False) -> dict:
    """Train + test-evaluate at every tau of the grid and with tau auto; returns the results mapping.

    Each finished grid run is kept in <work>/runs/<tau>.json with the registry it ran on (and a hash of the
    code under models/), and reused when the sweep is started again on the same registry and
    code (an interrupted sweep loses at most the run in progress)."""
    ws = Workspace(config)
    root = ws.store
    code = sorted((Path(__file__).resolve().parents[1] / "models").glob("*.py"))  # every file a run's numbers rest on
    settings = config.read_text() + "".join(hashlib.sha256(f.read_bytes()).hexdigest()[:16] for f in code)
    runs = {}
    for tau in grid:
        done = root.parent / "runs" / f"{tau_label(tau)}.json"
        kept = json.loads(done.read_text()) if done.exists() else {}
        if kept.get("registry") == settings:
            runs[tau_label(tau)] = kept["run"]
            print(f"tau={tau_label(tau)}: reusing the finished run in {done}", file=sys.stderr)
            continue
        ws.store = root.parent / f"store-tau-{tau_label(tau)}"
        t0 = time.perf_counter()
        ws.train(tau=tau, progress=progress, fit_router=False)
        res = ws.evaluate(split="test")
        runs[tau_label(tau)] = {"tau": tau, "seconds": time.perf_counter() - t0,
                                "perplexity": {n: r["perplexity"] for n, r in res.items()},
                                "base_perplexity": {n: r["base_perplexity"] for n, r in res.items()},
                                "n_train": {n: r["n_train"] for n, r in res.items()}}
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"registry": settings, "run": runs[tau_label(tau)]}, indent=2))
        if progress:
            print(f"tau={tau_label(tau)}: " + json.dumps(runs[tau_label(tau)]["perplexity"]), file=sys.stderr)
    if not auto_evaluations:
        return {"runs": runs}
    from hub.tau_search import search_tau

    ws.store = root.parent / "store-tau-auto"
    t0 = time.perf_counter()
    search_tau(ws, progress=progress, fit_router=False, evaluations=auto_evaluations)
    from hub.store import read_state

    search = read_state(ws.store)["metrics"]["tau_search"]
    res = ws.evaluate(split="test")
    auto = {"tau": search["chosen_tau"], "seconds": time.perf_counter() - t0, "search": search,
            "perplexity": {n: r["perplexity"] for n, r in res.items()}}
    return {"runs": runs, "auto": auto, **summarise(runs, auto)}


def summarise(runs: dict, auto: dict) -> dict:
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    means = {k: mean(r["perplexity"]) for k, r in runs.items()}
    middle = {k: v for k, v in means.items() if k not in ("0", "shared")}
    best = min(middle, key=middle.get) if middle else min(means, key=means.get)
    tasks = list(runs[best]["perplexity"])
    per_task = {}
    for t in tasks:
        p_best, p0, ps = runs[best]["perplexity"][t], runs["0"]["perplexity"][t], runs["shared"]["perplexity"][t]
        per_task[t] = {"n_train": runs[best]["n_train"][t], "best_tau": p_best, "tau_0": p0, "shared": ps,
                       "beats_both": p_best < p0 and p_best < ps,
                       "gain_vs_better_extreme": 1 - p_best / min(p0, ps),
                       "gain_vs_tau_0": 1 - p_best / p0, "gain_vs_shared": 1 - p_best / ps}
    better_extreme = min(means["0"], means["shared"])
    return {
        "mean_perplexity": means, "best_grid_tau": best,
        "best_beats_both_on_every_task": all(v["beats_both"] for v in per_task.values()),
        "mean_gain_vs_better_extreme": 1 - means[best] / better_extreme,
        "per_task": per_task,
        "auto_mean_perplexity": mean(auto["perplexity"]),
        "auto_vs_best_grid": mean(auto["perplexity"]) / means[best] - 1,
    }


def plot(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    labels = list(runs)
    finite = [float(runs[k]["tau"]) for k in labels if k not in ("0", "shared")]
    lo, hi = (min(finite), max(finite)) if finite else (1.0, 10.0)
    xs = {k: lo / 10 if k == "0" else hi * 10 if k == "shared" else float(runs[k]["tau"]) for k in labels}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tasks = list(runs[labels[0]]["perplexity"])
    for t in tasks:
        ax.plot([xs[k] for k in labels], [runs[k]["perplexity"][t] for k in labels], marker="o", alpha=0.7,
                label=f"{t} (n={runs[labels[0]]['n_train'][t]})")
    ax.plot([xs[k] for k in labels], [result["mean_perplexity"][k] for k in labels], color="black", linewidth=3,
            marker="o", label="mean")
    ax.axhline(result["auto_mean_perplexity"], color="gray", linestyle="--",
               label=f"tau auto ({result['auto']['tau']:.3g}), mean")
    ax.set_xscale("log")
    ax.set_xticks([xs[k] for k in labels],
                  [("0" if k == "0" else "∞ (shared)" if k == "shared" else k) for k in labels])
    ax.set_xlabel("tau (prior precision)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("BoRA on BBC News topics (SmolLM2-135M)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p1 = out_dir / "bora_bbc_tau.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    pt = result["per_task"]
    ns = [pt[t]["n_train"] for t in tasks]
    ax.plot(ns, [100 * pt[t]["gain_vs_tau_0"] for t in tasks], marker="o", label="vs tau=0 (independent)")
    ax.plot(ns, [100 * pt[t]["gain_vs_shared"] for t in tasks], marker="s", label="vs tau=shared (one adapter)")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("training documents of the task")
    ax.set_ylabel(f"perplexity reduction at tau={result['best_grid_tau']} (%)")
    ax.legend()
    fig.tight_layout()
    p2 = out_dir / "bora_bbc_gain.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [str(p1), str(p2)]


PAPER = "OPT-350m, Talk of Norway, 25 speakers: tau=0 16.80, best tau 12.82, largest tau 13.91"


def table(result: dict) -> str:
    """The reproduction table (markdown), generated from the results mapping."""
    runs = result["runs"]
    labels = list(runs)
    best = result["best_grid_tau"]
    head = "| task | train docs | " + " | ".join(f"tau={k}" for k in labels) + " | tau auto | best beats both |"
    lines = [head, "|" + "---|" * (len(labels) + 4)]
    for t, row in result["per_task"].items():
        cells = [f"{runs[k]['perplexity'][t]:.2f}" for k in labels]
        lines.append(f"| {t} | {row['n_train']} | " + " | ".join(cells) +
                     f" | {result['auto']['perplexity'][t]:.2f} | {'yes' if row['beats_both'] else 'no'} |")
    lines.append("| **mean** | | " + " | ".join(f"**{result['mean_perplexity'][k]:.2f}**" for k in labels) +
                 f" | **{result['auto_mean_perplexity']:.2f}** | |")
    lines += ["", f"Best grid tau: **{result['best_grid_tau']}**; it beats both extremes on every task: "
              f"**{'yes' if result['best_beats_both_on_every_task'] else 'no'}**; mean gain over the better extreme: "
              f"**{100 * result['mean_gain_vs_better_extreme']:.2f}%**. `tau: auto` chose tau = "
              f"{result['auto']['tau']:.4g}, mean perplexity {100 * result['auto_vs_best_grid']:+.2f}% "
              "vs the best grid tau.",
              f"Paper ({PAPER}).",
              f"Side by side, the best tau's mean perplexity relative to the extremes: paper "
              f"{100 * (12.82 / 16.80 - 1):+.1f}% vs tau=0 and {100 * (12.82 / 13.91 - 1):+.1f}% vs the largest tau; "
              "here "
              f"{100 * (result['mean_perplexity'][best] / result['mean_perplexity']['0'] - 1):+.1f}% vs tau=0 and "
              f"{100 * (result['mean_perplexity'][best] / result['mean_perplexity']['shared'] - 1):+.1f}% vs shared.",
              f"Command: `{result['command']}`; {result['machine']}; {result['date']}."]
    return "\n".join(lines)


def write_doc_table(result: dict, doc: Path) -> None:
    """Replace the generated block of docs/bora.md with the table of this run."""
    start, end = "<!-- bora_bbc table: generated by bench/bora_sweep.py -->", "<!-- end of generated table -->"
    text = doc.read_text()
    if start in text and end in text:
        a, b = text.index(start) + len(start), text.index(end)
        doc.write_text(text[:a] + "\n" + table(result) + "\n" + text[b:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run (minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--grid", default=None, help="comma-separated taus instead of the mode's grid, e.g. 0,100,shared")
    ap.add_argument("--no-auto", action="store_true", help="skip tau auto (grid runs only; writes no results file)")
    ap.add_argument("--work", default=None,
                    help="scratch folder for the runs' stores "
                         "(default .borahub/bora_sweep, --quick: .borahub/bora_sweep-quick)")
    ap.add_argument("--out", default=None, help="results folder (default docs/results; --quick: the work folder)")
    ap.add_argument("--render", metavar="JSON", help="only re-render the table, doc block and plots of a results file")
    args = ap.parse_args()
    if args.render:
        result = json.loads(Path(args.render).read_text())
        out_dir = Path(args.render).parent
        result["figures"] = plot(result, out_dir)
        (out_dir / "bora_bbc.md").write_text("# BoRA tau sweep on BBC News\n\n" + table(result) + "\n")
        write_doc_table(result, Path(__file__).resolve().parents[1] / "docs" / "bora.md")
        return
    mode = dict(QUICK if args.quick else FULL)
    if args.grid:
        mode["grid"] = [t if t == "shared" else float(t) for t in args.grid.split(",")]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    work = Path(args.work or (".borahub/bora_sweep-quick" if args.quick else ".borahub/bora_sweep"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out or (work if args.quick else "docs/results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = run_sweep(bbc_registry(work, mode, args.seed), mode["grid"],
                       0 if args.no_auto else mode["auto_evaluations"], progress=True)
    if args.no_auto:
        print(json.dumps({k: r["perplexity"] for k, r in result["runs"].items()}, indent=2))
        return
    import torch

    result = {"command": "python " + " ".join(sys.argv), "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, " + (torch.cuda.get_device_name() if torch.cuda.is_available()
                                                      else f"cpu ({os.cpu_count()} cores)"),
              "mode": "quick" if args.quick else "full", "settings": mode, "seeds": [args.seed],
              "task_sizes": SIZES, "total_seconds": time.perf_counter() - t0, **result}
    result["figures"] = plot(result, out_dir)
    (out_dir / "bora_bbc.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out_dir / "bora_bbc.md").write_text("# BoRA tau sweep on BBC News\n\n" + table(result) + "\n")
    if not args.quick:
        write_doc_table(result, Path(__file__).resolve().parents[1] / "docs" / "bora.md")
    print(json.dumps({k: result[k] for k in ("mean_perplexity", "best_grid_tau", "best_beats_both_on_every_task",
                                             "mean_gain_vs_better_extreme", "auto_vs_best_grid", "total_seconds")},
                     indent=2))


if __name__ == "__main__":
    main()
