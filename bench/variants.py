"""Adapter variants on the embedded defaults: same tasks, same budget, one run.

Trains LoRA, MoSLoRA, SVFit, LoRA + HiddenKey and LoRA + GMT on the same BBC News topics (SmolLM2-135M,
same seed, steps, rows per step and learning rate), then reports held-out perplexity per task, trainable
parameters per task and the mean optimiser-step time as a ratio to LoRA's, all measured in this run.

    python bench/variants.py            # ~10 min on 2 CPU cores
Prints the JSON; a run of every variant also writes variants.json and variants.md to --out (docs/results).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from hub.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"type": "lora", "rank": 8, "alpha": 16, "target_modules": TARGETS}
VARIANTS = {  # name -> (adapter, extra task keys)
    "lora": (LORA, {}),
    "moslora": ({**LORA, "type": "moslora"}, {}),
    "svfit": ({"type": "svfit", "rank": 8, "target_modules": TARGETS}, {}),
    "lora+hiddenkey": (LORA, {"hiddenkey": {"key_drop": 0.1, "hidden_drop": 0.1, "kl_weight": 1.0}}),
    "lora+gmt": (LORA, {"gmt": {"keep_ratio": 0.2}}),
}


def registry(folder: Path, variant: str, args) -> Path:
    adapter, extra = VARIANTS[variant]
    cfg = {
        "base_model": "smollm2-135m", "store": "store", "prior": {"tau": args.tau},
        "training": {"steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                     "max_length": args.max_length, "lr": args.lr, "sampling": "proportional",
                     "checkpoint_every": args.steps, "eval_docs": args.eval_docs, "seed": args.seed},
        "adapter": adapter,
        "tasks": [{"name": t, "data": {"bbc_news": t, "max_train": args.max_train}, **extra} for t in args.topics],
    }
    path = folder / variant / "tasks.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_variant(path: Path) -> dict:
    ws = Workspace(path)
    report = ws.train(progress=False)
    mtm, _ = ws.trained_model()
    g, _ = mtm.locate(0)
    evals = ws.evaluate(mtm=mtm)
    return {
        "step_seconds": report.seconds / max(report.steps - report.start_step, 1),
        "trainable_per_task": g.dim,
        "perplexity": {t: r["perplexity"] for t, r in evals.items()},
        "base_perplexity": {t: r["base_perplexity"] for t, r in evals.items()},
        "mean_perplexity": sum(r["perplexity"] for r in evals.values()) / len(evals),
        "train_nll": report.last_nll,
    }


def verdicts(res: dict) -> dict[str, str]:
    """Each paper's claimed direction, checked against this run's mean held-out perplexity."""
    lora = res["lora"]["mean_perplexity"]

    def vs(name: str) -> str:
        p = res[name]["mean_perplexity"]
        return f"{p:.3f} vs LoRA {lora:.3f} ({100 * (p / lora - 1):+.2f}%)"

    sv = res["svfit"]
    ratio = res["lora"]["trainable_per_task"] / sv["trainable_per_task"]
    base = sum(sv["base_perplexity"].values()) / len(sv["base_perplexity"])
    gain = (base - sv["mean_perplexity"]) / max(base - lora, 1e-9)
    return {
        "moslora >= lora": ("holds" if res["moslora"]["mean_perplexity"] <= lora else "does not hold")
        + f": {vs('moslora')}",
        "hiddenkey >= lora": ("holds" if res["lora+hiddenkey"]["mean_perplexity"] <= lora else "does not hold")
        + f": {vs('lora+hiddenkey')}",
        "svfit close to lora with far fewer parameters": f"{vs('svfit')} with {ratio:.0f}x fewer trainable "
        f"parameters; SVFit recovers {100 * gain:.0f}% of LoRA's perplexity gain over the base model "
        f"({base:.3f})",
        "gmt (no direction claimed at this scale)": vs("lora+gmt"),
    }


def markdown(out: dict) -> str:
    res, topics = out["results"], out["config"]["topics"]
    head = "| variant | " + " | ".join(f"ppl {t}" for t in topics) + " | mean ppl | trainable / task | step time vs LoRA |"
    lines = [head, "|" + "---|" * (len(topics) + 4)]
    base = res["lora"]["base_perplexity"]
    lines.append("| base model (no adapter) | " + " | ".join(f"{base[t]:.3f}" for t in topics)
                 + f" | {sum(base.values()) / len(base):.3f} | 0 | - |")
    for name, r in res.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['perplexity'][t]:.3f}" for t in topics)
                     + f" | {r['mean_perplexity']:.3f} | {r['trainable_per_task']:,} | {r['step_time_ratio']:.2f} |")
    c = out["config"]
    return "\n".join([
        "# Adapter variants on the embedded defaults",
        "",
        f"Command: `{out['command']}`  ",
        f"Machine: {out['machine']}  ",
        f"Date: {out['date']}",
        "",
        f"SmolLM2-135M-Instruct, BBC News topics {', '.join(topics)} (max {c['max_train']} training documents "
        f"each), {c['steps']} optimiser steps of {c['batch_size']} x {c['grad_accum']} rows (max {c['max_length']} "
        f"tokens), lr {c['lr']}, tau {c['tau']}, seed {c['seed']}; held-out test perplexity on up to "
        f"{c['eval_docs']} documents per task. Rank 8 on all seven projections (SVFit: top 8 singular values "
        "per matrix). Step time = training wall time / steps, as a ratio to LoRA's in the same run (the "
        "cores were shared with other jobs, so the ratios are noisy).",
        "",
        *lines,
        "",
        "## Does each paper's direction hold here?",
        "",
        *[f"- **{k}**: {v}" for k, v in out["verdicts"].items()],
        "",
        f"One seed and {c['steps']} steps, and run-to-run noise was not measured; the papers' settings "
        "(longer training on GLUE, commonsense or instruction data) are far from this one. Treat the table as "
        "a smoke-scale comparison, not a replication.",
        "",
    ])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topics", default="business,politics,tech")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)  # GMT masks the gradient accumulated over these
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--max-train", type=int, default=100)
    p.add_argument("--eval-docs", type=int, default=24)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tau", type=float, default=1000.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = p.parse_args(argv)
    args.topics = args.topics.split(",")
    variants = args.variants.split(",")
    if "lora" not in variants:
        p.error("--variants must include lora (the reference for ratios)")
    torch.manual_seed(args.seed)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-variants.") as tmp:
        for v in variants:
            results[v] = run_variant(registry(Path(tmp), v, args))
            print(f"{v}: {json.dumps(results[v])}", file=sys.stderr, flush=True)
    for r in results.values():
        r["step_time_ratio"] = r["step_seconds"] / results["lora"]["step_seconds"]
    out = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["bench/variants.py", *(argv or sys.argv[1:])]),
        "machine": f"{os.cpu_count()} CPU cores (nproc {len(os.sched_getaffinity(0))}), {platform.processor() or platform.machine()}, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "date": datetime.date.today().isoformat(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "variants")},
        "results": results,
    }
    if {"moslora", "svfit", "lora+hiddenkey", "lora+gmt"} <= results.keys():
        out["verdicts"] = verdicts(results)
    print(json.dumps(out, indent=2))
    if "verdicts" in out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "variants.json").write_text(json.dumps(out, indent=2) + "\n")
        (folder / "variants.md").write_text(markdown(out))
    return out


if __name__ == "__main__":
    main()
