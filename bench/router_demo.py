"""Routing quality on the embedded default tasks (BBC News topics, held-out test split).

Fits the default router exactly as `borahub train` does (training inputs; thresholds calibrated on the
validation split), then on the test split reports accuracy and the per-task confusion matrix (also as a
PNG), what `--mode fallback` does to in-distribution inputs, how often out-of-distribution inputs
(Banking77 customer questions, a benchmark-only data set) fall back to Theta, how the validation-calibrated
thresholds carry over to the test split, routing latency per input, and the Bayesian scorer on a subset.
The router is not saved; the hub's adapters (for the Bayesian scorer) come from the trained store.

    python bench/router_demo.py [--config tasks.yaml] [--threads 1] [--depths 0.25,1.0] [--taps 0.5,0.75,1]
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hub import router as R  # noqa: E402
from hub.workspace import Workspace  # noqa: E402

BANKING = ROOT.parent / "shared" / "data" / "banking77" / "test.csv"


def texts_of(ws: Workspace, names: list[str], split: str) -> dict[str, list[str]]:
    return {n: [e.router_text for e in getattr(ws.data(n), split)] for n in names}


def flat(d: dict[str, list[str]], names: list[str]) -> tuple[list[str], torch.Tensor]:
    texts = [t for n in names for t in d[n] if t.strip()]
    y = torch.tensor([i for i, n in enumerate(names) for t in d[n] if t.strip()])
    return texts, y


def rates(routes: list[R.Route]) -> dict:
    n = len(routes)
    return {"fallback": sum(r.fallback for r in routes) / n,
            "unsure": sum(r.reason == "unsure" for r in routes) / n,
            "ood": sum(r.reason == "ood" for r in routes) / n}


def taps_arg(text: str) -> tuple[float, ...]:
    """--taps: comma-separated shares of the routing depth (RouterConfig.taps)."""
    return tuple(float(t) for t in text.split(","))


TAPS_HELP = "shares of the depth whose layers are read, comma-separated (1: the one layer at the depth)"


def evaluate_depth(mtm, train, val, test, depth: float, taps: tuple[float, ...] = R.RouterConfig.taps) -> dict:
    t0 = time.perf_counter()
    router = R.fit(mtm, train, val, R.RouterConfig(depth=depth, taps=taps))
    fit_s = time.perf_counter() - t0
    x_te, y_te = flat(test, router.tasks)
    e_te = R.embed(mtm, x_te, router.layers, router.max_tokens)
    pred = router.probs(e_te).argmax(1)
    return {"router": router, "fit_s": fit_s, "x_te": x_te, "y_te": y_te, "e_te": e_te,
            "accuracy": float((pred == y_te).float().mean()), "layer": router.layer}


def latency(router, mtm, texts: list[str], batch: int, reps: int) -> float:
    """Median seconds per input of router.route over ``reps`` passes of ``texts`` in batches of ``batch``."""
    per = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for s in range(0, len(texts), batch):
            router.route(mtm, texts[s: s + batch], mode="fallback")
        per.append((time.perf_counter() - t0) / len(texts))
    return statistics.median(per)


def plot_confusion(conf: list[list[int]], names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = max(4.4, 0.42 * len(names) + 2.0)  # room for the labels of many tasks
    fig, ax = plt.subplots(figsize=(side + 0.8, side))
    ax.imshow(conf, cmap="Blues")
    for i, row in enumerate(conf):
        for j, v in enumerate(row):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8 if len(names) > 8 else 10,
                    color="white" if v > max(map(max, conf)) / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true task")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "tasks.yaml"))
    ap.add_argument("--ood", type=int, default=200, help="Banking77 test questions used as OOD inputs")
    ap.add_argument("--bayes-docs", type=int, default=8, help="test inputs per task for the Bayesian scorer (0: skip)")
    ap.add_argument("--depths", default="0.25", help="embedding depths to compare; the first is reported in full")
    ap.add_argument("--taps", type=taps_arg, default=R.RouterConfig.taps, help=TAPS_HELP)
    ap.add_argument("--latency-inputs", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the cores of this machine are shared; idle pool threads spin)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    ws = Workspace(args.config)
    mtm, state = ws.trained_model()
    names = [n for n in mtm.task_names if ws.cfg.task(n).data is not None]
    train, val, test = (texts_of(ws, names, s) for s in ("train", "validation", "test"))
    with BANKING.open(newline="", encoding="utf-8") as f:
        bank = [r["text"] for r in csv.DictReader(f)]
    ood_texts = bank[:: max(1, len(bank) // args.ood)][: args.ood]

    depths = [float(x) for x in args.depths.split(",")]
    runs = [evaluate_depth(mtm, train, val, test, d, args.taps) for d in depths]
    main_run = runs[0]
    router, x_te, y_te, e_te = main_run["router"], main_run["x_te"], main_run["y_te"], main_run["e_te"]
    tasks = router.tasks
    p_te = router.probs(e_te)
    pred = p_te.argmax(1)
    conf = torch.zeros(len(tasks), len(tasks), dtype=torch.long)
    for t, q in zip(y_te.tolist(), pred.tolist()):
        conf[t, q] += 1
    ood_te = router.ood_scores(e_te)
    fb_te = router.decide(p_te, ood_te, "fallback", energy=router.energy(e_te))
    kept = torch.tensor([not r.fallback for r in fb_te])
    heads = [x.split("\n")[0] for x in x_te]  # BBC headlines: short inputs of the right topics
    e_head = R.embed(mtm, heads, router.layers, router.max_tokens)
    p_head = router.probs(e_head)
    fb_head = router.decide(p_head, router.ood_scores(e_head), "fallback", energy=router.energy(e_head))
    e_ood = R.embed(mtm, ood_texts, router.layers, router.max_tokens)
    s_ood = router.ood_scores(e_ood)
    fb_ood = router.decide(router.probs(e_ood), s_ood, "fallback", energy=router.energy(e_ood))

    # Calibration: thresholds set on validation, checked on test.
    x_va, y_va = flat(val, tasks)
    e_va = R.embed(mtm, x_va, router.layers, router.max_tokens)
    p_va = router.probs(e_va)
    mp_va, pr_va = p_va.max(1)
    mp_te = p_te.max(1).values
    sweep_conf = []
    for target in (0.9, 0.95, 0.97, 0.99):
        t = R.confidence_threshold(mp_va, pr_va == y_va, target)
        keep = mp_te >= t
        kept_acc = float((pred[keep] == y_te[keep]).float().mean()) if keep.any() else None
        sweep_conf.append({"target_accuracy": target, "threshold": t, "val_unsure": float((mp_va < t).float().mean()),
                           "test_unsure": float((~keep).float().mean()), "test_kept_accuracy": kept_acc})
    s_va = router.ood_scores(e_va)
    sweep_ood = []
    for q in (0.95, 0.99, 1.0):
        t = float(torch.quantile(s_va, q))
        sweep_ood.append({"quantile": q, "threshold": t,
                          "test_in_distribution_flagged": float((ood_te > t).float().mean()),
                          "banking77_flagged": float((s_ood > t).float().mean())})

    lat_texts = x_te[:: max(1, len(x_te) // args.latency_inputs)][: args.latency_inputs]
    lat = {"batch_1_s_per_input": latency(router, mtm, lat_texts, 1, args.reps),
           f"batch_{len(lat_texts)}_s_per_input": latency(router, mtm, lat_texts, len(lat_texts), args.reps)}

    bayes = None
    if args.bayes_docs > 0:  # router.bayes_probs over every task, with the log-likelihoods kept for a second prior
        sub = [i for t in range(len(tasks)) for i in (y_te == t).nonzero().flatten()[: args.bayes_docs].tolist()]
        gids = torch.tensor([mtm.task_id(n) for n in tasks]).expand(len(sub), -1)
        t0 = time.perf_counter()
        ll = R.log_likelihoods(mtm, [x_te[i] for i in sub], gids, router.max_tokens)
        bayes_s = (time.perf_counter() - t0) / len(sub)
        post = torch.softmax(ll + router.log_prior(), -1)
        bayes = {"inputs": len(sub), "accuracy": float((post.argmax(1) == y_te[sub]).float().mean()),
                 "accuracy_uniform_prior": float((ll.argmax(1) == y_te[sub]).float().mean()),
                 "classifier_accuracy_same_inputs": float((pred[sub] == y_te[sub]).float().mean()),
                 "mean_max_posterior": float(post.max(1).values.mean()),
                 "s_per_input": bayes_s, "store_steps": state.get("metrics", {}).get("steps"),
                 "store_tau": state.get("tau")}

    res = {
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "threads": args.threads,
        "date": dt.date.today().isoformat(), "base_model": state["base_model"], "tasks": tasks,
        "router": {"config": router.meta["config"], "layer": router.layer, "layers": router.layers,
                   "of_layers": mtm.lm.config.num_hidden_layers,
                   "max_tokens": router.max_tokens, "temperature": router.meta["temperature"],
                   "fit_s": main_run["fit_s"], "train_inputs": {n: min(len(train[n]), router.meta["config"]["max_docs"])
                                                                for n in tasks}},
        "test": {"inputs": len(x_te), "accuracy": main_run["accuracy"],
                 "per_task_recall": {n: float(conf[i, i] / conf[i].sum()) for i, n in enumerate(tasks)},
                 "confusion": conf.tolist(),
                 "fallback_mode": {**rates(fb_te), "kept_accuracy": float((pred[kept] == y_te[kept]).float().mean())}},
        "headlines": {"inputs": len(heads),
                      "mean_tokens": sum(len(mtm.tokenizer(h)["input_ids"]) for h in heads) / len(heads),
                      "accuracy": float((p_head.argmax(1) == y_te).float().mean()), "fallback_mode": rates(fb_head)},
        "ood": {"source": "banking77 test.csv (benchmark only)", "inputs": len(ood_texts),
                "mean_tokens": sum(len(mtm.tokenizer(t)["input_ids"]) for t in ood_texts) / len(ood_texts),
                "fallback_mode": rates(fb_ood)},
        "calibration": {"thresholds": router.thresholds, "validation": router.meta["calibration"],
                        "confidence_sweep": sweep_conf, "ood_sweep": sweep_ood},
        "latency": lat, "bayes": bayes,
        "depths": [{"depth": d, "layer": r["layer"], "test_accuracy": r["accuracy"], "fit_s": r["fit_s"]}
                   for d, r in zip(depths, runs)],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router_demo.json").write_text(json.dumps(res, indent=2))
    plot_confusion(conf.tolist(), tasks, out / "router_demo.png",
                   f"router on the test split: accuracy {main_run['accuracy']:.3f} (n={len(x_te)})")
    write_md(res, out / "router_demo.md")
    print(json.dumps(res, indent=2))


def write_md(res: dict, path: Path) -> None:
    r, te, ood, cal = res["router"], res["test"], res["ood"], res["calibration"]
    th, va = cal["thresholds"], cal["validation"]
    tasks = res["tasks"]
    lines = [
        "# Router on the embedded default tasks", "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}; torch threads: {res['threads']}; date: {res['date']}", "",
        f"Base model {res['base_model']}; embeddings: mean hidden states after layers "
        f"{', '.join(map(str, r.get('layers', [r['layer']])))} of {r['of_layers']} (concatenated) "
        f"over the first {r['max_tokens']} tokens, adapters off; softmax regression, "
        f"temperature {r['temperature']:.2f}. "
        f"Fit (embedding the training and validation inputs included): {r['fit_s']:.1f} s.", "",
        f"## Held-out test split ({te['inputs']} inputs)", "",
        f"Accuracy (`--mode select`): **{te['accuracy']:.3f}**", "",
        "![confusion](router_demo.png)", "",
        "| true \\ routed | " + " | ".join(tasks) + " | recall |", "|---|" + "---:|" * (len(tasks) + 1),
    ]
    for i, n in enumerate(tasks):
        row = " | ".join(str(v) for v in te["confusion"][i])
        lines.append(f"| {n} | {row} | {te['per_task_recall'][n]:.3f} |")
    fm = te["fallback_mode"]
    lines += ["", f"`--mode fallback` on the test split: {fm['fallback']:.1%} fall back to Theta "
              f"({fm['unsure']:.1%} unsure, {fm['ood']:.1%} out of distribution); accuracy on the rest "
              f"{fm['kept_accuracy']:.3f}.", "",
              f"## Out-of-distribution inputs ({ood['inputs']} Banking77 questions)", "",
              f"`--mode fallback`: **{ood['fallback_mode']['fallback']:.1%}** fall back to Theta "
              f"({ood['fallback_mode']['ood']:.1%} by the OOD score, "
              f"{ood['fallback_mode']['unsure']:.1%} as unsure).", "",
              f"## Short in-distribution inputs ({res['headlines']['inputs']} test headlines, "
              f"{res['headlines']['mean_tokens']:.0f} tokens on average; Banking77: {ood['mean_tokens']:.0f})", "",
              f"Accuracy (`--mode select`): {res['headlines']['accuracy']:.3f}; `--mode fallback`: "
              f"{res['headlines']['fallback_mode']['fallback']:.1%} fall back "
              f"({res['headlines']['fallback_mode']['ood']:.1%} by the OOD score). The router is fitted on the first "
              f"{r['max_tokens']} tokens of whole articles and on their openings of 8-24 words (short views); a "
              "headline is shorter still, and short requests of other data sets (Banking77 here) are then judged on "
              "content alone: the distance test cannot tell a 5-word headline from a banking question as well as "
              "it tells an article from one.", "",
              "## Calibration (thresholds set on the validation split at fit time)", "",
              f"Validation: {va['inputs']} inputs, accuracy {va['accuracy']:.3f}. Fallback budget "
              f"{r['config']['fallback_budget']:.0%} ({va['false_fallback']:.1%} used): energy threshold "
              f"{th['energy']:.3f}, distance threshold {th['ood']:.3f}. The sweep below is the previous policy "
              "(a max-p threshold for a target accuracy), kept for comparison.", "",
              "| target accuracy | threshold | unsure (val) | unsure (test) | accuracy kept (test) |",
              "|---:|---:|---:|---:|---:|"]
    for s in cal["confidence_sweep"]:
        kept = "-" if s["test_kept_accuracy"] is None else f"{s['test_kept_accuracy']:.3f}"
        lines.append(f"| {s['target_accuracy']} | {s['threshold']:.3f} | {s['val_unsure']:.1%} | "
                     f"{s['test_unsure']:.1%} | {kept} |")
    lines += ["", "| OOD quantile | threshold | test inputs flagged | Banking77 flagged |", "|---:|---:|---:|---:|"]
    lines += [f"| {s['quantile']} | {s['threshold']:.3f} | {s['test_in_distribution_flagged']:.1%} | "
              f"{s['banking77_flagged']:.1%} |" for s in cal["ood_sweep"]]
    lines += ["", "## Latency (routing only, per input)", ""]
    lines += [f"- {k.removesuffix('_s_per_input').replace('_', ' ')}: {v * 1e3:.1f} ms"
              for k, v in res["latency"].items()]
    if res["bayes"]:
        b = res["bayes"]
        lines += ["", "## Bayesian scorer", "",
                  f"p(task | x) ∝ p(x | adapter) p(task) on {b['inputs']} test inputs (hub trained {b['store_steps']} "
                  f"steps, tau {b['store_tau']}): accuracy {b['accuracy']:.3f} with the training-share prior "
                  f"(mean max posterior {b['mean_max_posterior']:.2f}), "
                  f"{b['accuracy_uniform_prior']:.3f} with a uniform prior, vs the classifier's "
                  f"{b['classifier_accuracy_same_inputs']:.3f} on the same inputs; "
                  f"{b['s_per_input'] * 1e3:.0f} ms per input (every task scored, in mixed batches)."]
    if len(res["depths"]) > 1:
        lines += ["", "## Embedding depth", "", "| depth | layer | test accuracy | fit s |", "|---:|---:|---:|---:|"]
        lines += [f"| {d['depth']} | {d['layer']} | {d['test_accuracy']:.3f} | {d['fit_s']:.1f} |"
                  for d in res["depths"]]
    lines.append("")
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
