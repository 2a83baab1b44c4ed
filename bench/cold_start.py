"""A new task with few documents: cold start from the BoRA prior vs a plain LoRA from scratch.

A hub is trained on four BBC News topics (SmolLM2-135M). The fifth topic is then added as a new task with
N training documents (N = 10, 30, 100) and trained alone, for the same steps in every arm:

  cold        `borahub tasks add` + `borahub train --tasks NEW`: starts at the stored Theta, the other tasks
              and Theta frozen, the hub's prior (tau) applied
  cold-tau0   the same start at Theta without the prior (tau 0): separates the start from the prior
  scratch     a plain LoRA: the new task alone, fresh init (B = 0), tau 0

and two references without training: the base model alone and Theta alone (the global adapter).
Held-out perplexity is on the new topic's test split, the same documents for every N.

    python bench/cold_start.py            # ~15 min on 2 CPU cores
Prints the JSON and writes cold_start.json and cold_start.md to --out (docs/results).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from hub.workspace import Workspace
from models.stacked import GLOBAL
from tasks.batching import Tokenized, eval_batches

ROOT = Path(__file__).resolve().parents[1]
TOPICS = ["business", "entertainment", "politics", "sports", "tech"]


def write_registry(folder: Path, tasks: list[dict], tau, args) -> Path:
    cfg = {
        "base_model": "smollm2-135m", "store": "store", "prior": {"tau": tau},
        "training": {"steps": args.hub_steps, "batch_size": args.batch_size, "max_length": args.max_length,
                     "lr": args.lr, "sampling": "proportional", "checkpoint_every": 1000,
                     "eval_docs": args.eval_docs, "seed": args.seed},
        "adapter": {"type": "lora", "rank": 8, "alpha": 16,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "tasks": tasks,
    }
    folder.mkdir(parents=True)
    (folder / "tasks.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder / "tasks.yaml"


def new_task(args, n: int) -> dict:
    return {"name": args.new, "data": {"bbc_news": args.new, "max_train": n}}


def test_batches(ws: Workspace, name: str, route: int):
    """The first eval_docs test documents of task ``name`` as batches routed to ``route``."""
    _, tok = ws.base()
    toks = ws.tokens(name, "test")
    n = ws.cfg.training.eval_docs
    return eval_batches(Tokenized(toks.ids[:n], toks.n_prompt[:n]), route, ws.cfg.training.batch_size, tok.pad_token_id)


def train_and_eval(cfg: Path, args, names: list[str] | None, tau=None) -> dict:
    ws = Workspace(cfg)
    t0 = time.perf_counter()
    ws.train(names, steps=args.steps, tau=tau, progress=False, fit_router=False)
    seconds = time.perf_counter() - t0
    mtm, _ = ws.trained_model()
    ppl = mtm.perplexity(test_batches(ws, args.new, mtm.task_id(args.new)))
    del ws, mtm
    gc.collect()
    return {"perplexity": ppl, "seconds": round(seconds, 1)}


def run(args, work: Path) -> dict:
    hub_tasks = [{"name": t, "data": {"bbc_news": t, "max_train": args.hub_max_train}} for t in TOPICS if t != args.new]
    hub_cfg = write_registry(work / "hub", hub_tasks, args.tau, args)
    t0 = time.perf_counter()
    hub = Workspace(hub_cfg)
    hub.train(progress=False, fit_router=False)
    hub_seconds = time.perf_counter() - t0
    del hub
    gc.collect()
    print(f"hub trained in {hub_seconds:.0f}s", file=sys.stderr, flush=True)

    # References: the base model and Theta alone on the new topic (no training on it).
    ref_cfg = write_registry(work / "ref", hub_tasks + [new_task(args, max(args.sizes))], args.tau, args)
    shutil.copytree(work / "hub" / "store", work / "ref" / "store")
    ref = Workspace(ref_cfg)
    mtm, _ = ref.trained_model()  # the hub's tasks only: Theta is what a new task would start at
    refs = {"base": mtm.perplexity(test_batches(ref, args.new, GLOBAL), adapters=False),
            "theta": mtm.perplexity(test_batches(ref, args.new, GLOBAL))}
    n_test = min(len(ref.tokens(args.new, "test").ids), args.eval_docs)
    del ref, mtm
    gc.collect()

    results = {}
    for n in args.sizes:
        row = {}
        for arm in args.arms:
            folder = work / f"{arm}-{n}"
            if arm == "scratch":
                cfg = write_registry(folder, [new_task(args, n)], 0.0, args)
                row[arm] = train_and_eval(cfg, args, None)
            else:  # tasks add + train --tasks NEW on a copy of the hub
                cfg = write_registry(folder, hub_tasks + [new_task(args, n)], args.tau, args)
                shutil.copytree(work / "hub" / "store", folder / "store")
                row[arm] = train_and_eval(cfg, args, [args.new], tau=0.0 if arm == "cold-tau0" else None)
            print(f"N={n} {arm}: {json.dumps(row[arm])}", file=sys.stderr, flush=True)
        results[str(n)] = row
    return {"hub_seconds": round(hub_seconds, 1), "test_docs": n_test,
            "references": {k: round(v, 3) for k, v in refs.items()}, "results": results}


def markdown(out: dict) -> str:
    c, res = out["config"], out["results"]
    arms = c["arms"]
    lines = [
        "# Cold start of a new task from the BoRA prior",
        "",
        f"Command: `{out['command']}`  ",
        f"Machine: {out['machine']}  ",
        f"Date: {out['date']} (load average at start {out['load_average_at_start'][0]}: other jobs shared the CPU)",
        "",
        f"A hub is trained on the BBC News topics {', '.join(t for t in TOPICS if t != c['new'])} "
        f"({c['hub_max_train']} documents each, {c['hub_steps']} steps, tau = {c['tau']} as a Gaussian precision). "
        f"Then `{c['new']}` is added as a new task with N training documents and trained alone for {c['steps']} steps "
        f"({c['batch_size']} rows of at most {c['max_length']} tokens per step, lr {c['lr']}, SmolLM2-135M). "
        f"Held-out perplexity on the same {out['test_docs']} test documents of `{c['new']}` for every N "
        "(lower is better).",
        "",
        f"- **cold**: `borahub tasks add` + `borahub train --tasks {c['new']}`: starts at the hub's Theta, "
        "other tasks and Theta frozen, the hub's prior applied",
        "- **cold-tau0**: the same start at Theta, no prior (tau 0)",
        "- **scratch**: a plain LoRA, fresh init (B = 0), tau 0, the new task alone",
        "",
        f"References without training on `{c['new']}`: base model {out['references']['base']:.2f}, "
        f"Theta alone (the hub's global adapter) {out['references']['theta']:.2f}.",
        "",
        "| N train docs | " + " | ".join(arms) + " |",
        "|---|" + "---|" * len(arms),
    ]
    for n, row in res.items():
        best = min(row[a]["perplexity"] for a in arms)
        cells = [(f"**{row[a]['perplexity']:.2f}**" if row[a]["perplexity"] == best else f"{row[a]['perplexity']:.2f}")
                 for a in arms]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    epochs = ", ".join(f"{c['steps'] * c['batch_size'] / int(n):.0f}x (N = {n})" for n in res)
    seconds = [r[a]["seconds"] for r in res.values() for a in arms]
    lines += [
        "",
        f"Every arm gets the same {c['steps']} steps at lr {c['lr']} and no early stopping, so each training document "
        f"is seen about {epochs}: the table compares the starts under one fixed budget, not each arm at its best "
        "stopping point.",
        "",
        f"Training took {out['hub_seconds']:.0f} s for the hub and {min(seconds):.0f}-{max(seconds):.0f} s per "
        f"new-task run ({(out['hub_seconds'] + sum(seconds)) / 60:.0f} min in all) on a CPU shared with other jobs.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new", default="tech", choices=TOPICS, help="the topic added as the new task")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10, 30, 100])
    p.add_argument("--arms", type=lambda s: s.split(","), default=["cold", "cold-tau0", "scratch"])
    p.add_argument("--hub-steps", type=int, default=40)
    p.add_argument("--hub-max-train", type=int, default=100)
    p.add_argument("--steps", type=int, default=20, help="optimiser steps of each new-task run")
    p.add_argument("--tau", type=float, default=1000.0, help="the hub's prior precision")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-docs", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = p.parse_args(argv)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="borahub-cold-") as tmp:
        measured = run(args, Path(tmp))
    out = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["bench/cold_start.py", *(argv or sys.argv[1:])]),
        "machine": f"{os.cpu_count()} CPU cores (nproc {len(os.sched_getaffinity(0))}), "
                   f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
        "date": datetime.date.today().isoformat(),
        "load_average_at_start": [round(x, 1) for x in load],  # the machine is shared: other jobs slow every arm alike
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        **measured,
    }
    for row in out["results"].values():
        for r in row.values():
            r["perplexity"] = round(r["perplexity"], 3)
    print(json.dumps(out, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cold_start.json").write_text(json.dumps(out, indent=2) + "\n")
    (Path(args.out) / "cold_start.md").write_text(markdown(out))
    return out


if __name__ == "__main__":
    main()
