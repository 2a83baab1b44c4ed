"""Routing on two hubs of different kinds, as a user gets it: HWU64 scenarios (short spoken requests, 18 tasks)
and the BBC News topics (long documents, 5 tasks).

Each hub is a real registry in a temp folder (HWU64: one CSV of training requests per scenario; BBC: the
embedded topics); the router is fitted exactly as `borahub train` fits it (`fit_from_workspace`, raw inputs,
thresholds on the validation split) and applied with `Router.route` to the held-out requests: HWU64's test.csv
and the BBC test split. Routing reads the frozen base model only, so the hubs' adapters are left untrained.
Reports per hub and depth: select accuracy, default-mode (fallback) false fallback and accuracy on the rest,
OOD recall (Banking77 requests into the HWU64 hub, HWU64 requests into the BBC hub), requests per second
(batches of 16), fit time; confusion PNGs. Prints JSON; writes docs/results/router.{json,md} + PNGs.

    python bench/router.py [--threads 2] [--depths 0.25,0.15,0.5] [--taps 0.5,0.75,1] [--out docs/results]
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.router_demo import TAPS_HELP, plot_confusion, taps_arg  # noqa: E402
from hub import router as R  # noqa: E402
from hub.workspace import Workspace  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def hwu_registry(folder: Path) -> tuple[Path, list[tuple[str, str]]]:
    """A registry with one task per HWU64 scenario (its training requests); the test requests as (task, text)."""
    train = read_csv(DATA / "hwu64" / "train.csv")
    scenarios = sorted({r["scenario"] for r in train})
    tasks = []
    for s in scenarios:
        path = folder / f"{s}.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text"])
            w.writerows([r["text"]] for r in train if r["scenario"] == s)
        tasks.append({"name": s, "data": {"path": path.name, "test": 0.01}})  # test.csv is the held-out set
    cfg = folder / "tasks.yaml"
    cfg.write_text(yaml.safe_dump({"store": "store", "tasks": tasks}, sort_keys=False))
    return cfg, [(r["scenario"], r["text"]) for r in read_csv(DATA / "hwu64" / "test.csv")]


def bbc_registry(folder: Path) -> tuple[Path, list[tuple[str, str]]]:
    topics = ["business", "entertainment", "politics", "sports", "tech"]
    cfg = folder / "tasks.yaml"
    cfg.write_text(yaml.safe_dump({"store": "store", "tasks": [{"name": t, "data": {"bbc_news": t}} for t in topics]},
                                  sort_keys=False))
    ws = Workspace(cfg)
    return cfg, [(t, e.router_text) for t in topics for e in ws.data(t).test]


def short_inputs(router, mtm, items: list[tuple[str, str]]) -> dict:
    """Select accuracy and default-mode fallback on (task, short text) pairs of a known task."""
    routes = router.route(mtm, [x for _, x in items], mode="fallback") if items else []
    n = max(1, len(items))
    return {"inputs": len(items), "mean_words": round(sum(len(x.split()) for _, x in items) / n, 1),
            "select_accuracy": round(sum(t == max(r.scores, key=r.scores.get)
                                         for (t, _), r in zip(items, routes)) / n, 4),
            "false_fallback": round(sum(r.fallback for r in routes) / n, 4)}


def evaluate(cfg: Path, test: list[tuple[str, str]], ood: list[str], depth: float, png: Path | None,
             taps: tuple[float, ...] = R.RouterConfig.taps) -> dict:
    ws = Workspace(cfg)
    mtm = ws.new_model()
    t0 = time.perf_counter()
    router = R.fit_from_workspace(ws, mtm, R.RouterConfig(depth=depth, taps=taps))
    fit_s = time.perf_counter() - t0
    texts, want = [x for _, x in test], [t for t, _ in test]
    t0 = time.perf_counter()
    routes = router.route(mtm, texts, mode="fallback")
    rps = len(texts) / (time.perf_counter() - t0)
    top = [max(r.scores, key=r.scores.get) for r in routes]  # what --mode select would pick
    kept = [not r.fallback for r in routes]
    ood_routes = router.route(mtm, ood, mode="fallback")
    openings = R.short_views(test, seed=2)  # the opening 8-24 words of long test inputs (a sentence or two)
    heads = [(t, x.split("\n")[0]) for t, x in test if "\n" in x.strip()]  # BBC articles open with their headline
    names = router.tasks
    conf = [[sum(1 for w, p in zip(want, top) if w == a and p == b) for b in names] for a in names]
    sel_acc = sum(w == p for w, p in zip(want, top)) / len(want)
    if png is not None:
        plot_confusion(conf, names, png, f"{cfg.parent.name}: select accuracy {sel_acc:.3f} (n={len(want)})")
    cal = router.meta["calibration"]
    return {
        "depth": depth, "layer": router.layer, "layers": router.layers, "of_layers": mtm.lm.config.num_hidden_layers,
        "tasks": len(names),
        "fit_s": round(fit_s, 1), "train_inputs": sum(min(len(ws.data(n).train), router.meta["config"]["max_docs"])
                                                      for n in names),
        "validation": {k: cal[k] for k in ("inputs", "accuracy", "false_fallback", "kept_accuracy")},
        "test_inputs": len(want), "select_accuracy": round(sel_acc, 4),
        "false_fallback": round(1 - sum(kept) / len(kept), 4),
        "accuracy_on_the_rest": round(sum(w == r.task for w, r, k in zip(want, routes, kept) if k) / max(1, sum(kept)),
                                      4),
        "ood_inputs": len(ood), "ood_recall": round(sum(r.fallback for r in ood_routes) / len(ood), 4),
        "ood_by_reason": {k: sum(r.reason == k for r in ood_routes) / len(ood) for k in ("ood", "unsure")},
        "openings": short_inputs(router, mtm, openings), "headlines": short_inputs(router, mtm, heads),
        "requests_per_s": round(rps, 1),
        "mean_tokens": round(sum(len(mtm.tokenizer(x)["input_ids"][: router.max_tokens]) for x in texts) / len(texts),
                             1),
        "confusion": {"tasks": names, "matrix": conf},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depths", default="0.25", help="first: the full report; others: accuracy vs speed")
    ap.add_argument("--taps", type=taps_arg, default=R.RouterConfig.taps, help=TAPS_HELP)
    ap.add_argument("--ood", type=int, default=1000, help="Banking77 test requests sent to the HWU64 hub")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bank = [r["text"] for r in read_csv(DATA / "banking77" / "test.csv")]
    bank = bank[:: max(1, len(bank) // args.ood)][: args.ood]
    depths = [float(d) for d in args.depths.split(",")]
    res = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "threads": args.threads,
           "date": dt.date.today().isoformat(), "router_config": R.RouterConfig(taps=args.taps).__dict__, "hubs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "hwu64").mkdir()
        (Path(tmp) / "bbc").mkdir()
        hwu_cfg, hwu_test = hwu_registry(Path(tmp) / "hwu64")
        bbc_cfg, bbc_test = bbc_registry(Path(tmp) / "bbc")
        hubs = {"hwu64": (hwu_cfg, hwu_test, bank), "bbc": (bbc_cfg, bbc_test, [x for _, x in hwu_test])}
        for name, (cfg, test, ood) in hubs.items():
            res["hubs"][name] = []
            for i, d in enumerate(depths):
                row = evaluate(cfg, test, ood, d, out / f"router_{name}.png" if i == 0 else None, args.taps)
                res["hubs"][name].append(row)
                print(json.dumps({name: {k: v for k, v in row.items() if k != "confusion"}}), flush=True)
    (out / "router.json").write_text(json.dumps(res, indent=1))
    write_md(res, out / "router.md")


def write_md(res: dict, path: Path) -> None:
    lines = ["# Routing on two hubs: HWU64 scenarios (short requests) and BBC topics (documents)", "",
             f"Command: `{res['command']}`  ", f"Machine: {res['machine']}; torch threads {res['threads']}; "
             f"{res['date']}. Router defaults: {json.dumps(res['router_config'])}", "",
             "Default mode = `fallback` (budget: 5% of validation inputs to Θ, with 90% confidence). "
             "OOD: Banking77 test requests into the "
             "HWU64 hub, HWU64 test requests into the BBC hub.", "",
             "Openings: the first 8-24 words of each long test input (BBC articles), as a user sends a sentence. "
             "Headlines: the first line of each BBC test article (about 5 words).", "",
             "| hub | depth (layers) | select acc. | false fallback | acc. on the rest | OOD recall | requests/s | "
             "mean tokens | fit s | openings: select acc. / false fallback | headlines: select acc. / false fallback |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in res["hubs"].items():
        for r in rows:
            layers = ", ".join(map(str, r["layers"]))
            lines.append(f"| {name} | {r['depth']} ({layers} of {r['of_layers']}) | {r['select_accuracy']:.3f} | "
                         f"{r['false_fallback']:.1%} | {r['accuracy_on_the_rest']:.3f} | {r['ood_recall']:.1%} | "
                         f"{r['requests_per_s']:.1f} | {r['mean_tokens']} | {r['fit_s']} | " +
                         (f"{r['openings']['select_accuracy']:.3f} / {r['openings']['false_fallback']:.1%} |"
                          if r["openings"]["inputs"] else "- |") +
                         (f" {r['headlines']['select_accuracy']:.3f} / {r['headlines']['false_fallback']:.1%} |"
                          if r["headlines"]["inputs"] else " - |"))
    lines += ["", "![HWU64 confusion](router_hwu64.png)", "", "![BBC confusion](router_bbc.png)", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
