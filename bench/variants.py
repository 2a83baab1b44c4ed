"""Adapter variants on the embedded defaults: same tasks, same budget, one run.

Trains LoRA, MoSLoRA, SVFit, LoRA + HiddenKey and LoRA + GMT on the same BBC News topics (SmolLM2-135M,
same seed, steps, rows per step and learning rate), then reports held-out perplexity per task, trainable
parameters per task and the median optimiser-step time as a ratio to LoRA's, all measured in this run.

    python bench/variants.py            # ~20 min on 2 CPU cores shared with other jobs
Prints the JSON; a run of every variant also writes variants.json and variants.md to --out (docs/results).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from hub.workspace import Workspace
from models.hiddenkey import HiddenKey
from tasks.batching import Tokenized, eval_batches
from models.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"type": "lora", "rank": 8, "alpha": 16, "target_modules": TARGETS}
SVFIT = {"type": "svfit", "rank": 8, "target_modules": TARGETS}
VARIANTS = {  # name -> (adapter, extra task keys, learning-rate multiplier)
    "lora": (LORA, {}, 1),
    "moslora": ({**LORA, "type": "moslora"}, {}, 1),
    "svfit": (SVFIT, {}, 1),
    # Sensitivity row: an Adam step moves each singular value by at most about lr, while SmolLM2's top
    # singular values are 10-80, so at the shared lr SVFit can change them by well under 1% in 25 steps.
    "svfit (lr x30)": (SVFIT, {}, 30),
    "lora+hiddenkey": (LORA, {"hiddenkey": {"key_drop": 0.1, "hidden_drop": 0.1, "kl_weight": 1.0}}, 1),
    # Sensitivity row: SmolLM2's FFN outputs carry a few massive activations (|x| up to ~5700 in one
    # channel against a median near 1), which element-wise HiddenCut drops or rescales.
    "lora+hiddenkey (no HiddenCut)": (LORA, {"hiddenkey": {"key_drop": 0.1, "hidden_drop": 0.0,
                                                           "kl_weight": 1.0}}, 1),
    "lora+gmt": (LORA, {"gmt": {"keep_ratio": 0.2}}, 1),
}


def registry(folder: Path, variant: str, args) -> Path:
    adapter, extra, lr_scale = VARIANTS.get(variant, (LORA, {}, 1))
    cfg = {
        "base_model": "smollm2-135m", "store": "store", "prior": {"tau": args.tau},
        "training": {"steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                     "max_length": args.max_length, "lr": args.lr * lr_scale, "sampling": "proportional",
                     "checkpoint_every": args.steps, "eval_docs": args.eval_docs, "seed": args.seed},
        "adapter": adapter,
        "tasks": [{"name": t, "data": {"bbc_news": t, "max_train": args.max_train}, **extra} for t in args.topics],
    }
    path = folder / "".join(c if c.isalnum() or c in "+-" else "_" for c in variant) / "tasks.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def timed_steps(durations: list[tuple[float, float]]):
    """Record each optimiser step's (wall, process CPU) time; medians resist bursts of load from other jobs."""
    step = Trainer.train_step

    def timed(self):
        t0, c0 = time.perf_counter(), time.process_time()
        out = step(self)
        durations.append((time.perf_counter() - t0, time.process_time() - c0))
        return out

    return timed


def run_variant(path: Path) -> dict:
    ws = Workspace(path)
    durations: list[tuple[float, float]] = []
    original = Trainer.train_step
    Trainer.train_step = timed_steps(durations)
    try:
        report = ws.train(progress=False)
    finally:
        Trainer.train_step = original
    mtm, _ = ws.trained_model()
    g, _ = mtm.locate(0)
    evals = ws.evaluate(mtm=mtm)
    return {
        "step_seconds": statistics.median(d[0] for d in durations),
        "step_cpu_seconds": statistics.median(d[1] for d in durations),
        "train_seconds": report.seconds,
        "trainable_per_task": g.dim,
        "perplexity": {t: r["perplexity"] for t, r in evals.items()},
        "base_perplexity": {t: r["base_perplexity"] for t, r in evals.items()},
        "mean_perplexity": sum(r["perplexity"] for r in evals.values()) / len(evals),
        "train_nll": report.last_nll,
    }


def hiddenkey_probe(path: Path, rate: float = 0.1, draws: int = 3) -> dict:
    """The base model alone, in training mode, on 8 held-out rows of the first task: token NLL under
    HiddenKey's masks without any training (mean of ``draws`` mask draws), and the FFN outputs' largest
    |value| over real tokens against their median (massive activations, which element-wise HiddenCut drops or
    rescales)."""
    ws = Workspace(path)
    lm, tok = ws.base()
    toks = ws.tokens(ws.cfg.task_names[0], "test")
    batch = next(eval_batches(Tokenized(toks.ids[:8], toks.n_prompt[:8]), 0, 8, tok.pad_token_id))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    ffn = []
    real = batch["attention_mask"].bool()
    hooks = [m.register_forward_hook(lambda m, a, out: ffn.append(out.detach()[real].abs()))
             for n, m in lm.named_modules() if n.endswith(".mlp")]
    with torch.no_grad():
        lm.eval()
        lm(**inputs)
        for h in hooks:
            h.remove()
        hk = HiddenKey(lm)
        lm.train()
        nll = {}
        for name, (key, hidden) in {"none": (0, 0), "DropKey": (rate, 0), "HiddenCut": (0, rate),
                                    "both": (rate, rate)}.items():
            hk.set_rows(torch.full((8,), float(key)), torch.full((8,), float(hidden)))
            nll[name] = statistics.mean(float(lm(**inputs).loss) for _ in range(draws))
        lm.eval()
    acts = torch.cat([a.flatten() for a in ffn])
    return {"rate": rate, "nll": nll, "ffn_output_abs_max": float(acts.max()),
            "ffn_output_abs_median": float(acts.median())}


def verdicts(res: dict) -> dict[str, str]:
    """Each paper's claimed direction, checked against this run's mean held-out perplexity."""
    lora = res["lora"]["mean_perplexity"]

    def vs(name: str) -> str:
        p = res[name]["mean_perplexity"]
        return f"{p:.3f} vs LoRA {lora:.3f} ({100 * (p / lora - 1):+.2f}%)"

    base_ppl = res["lora"]["base_perplexity"]
    base = sum(base_ppl.values()) / len(base_ppl)

    def svfit(name: str) -> str:
        ratio = res["lora"]["trainable_per_task"] / res[name]["trainable_per_task"]
        gain = (base - res[name]["mean_perplexity"]) / max(base - lora, 1e-9)
        verdict = "holds" if res[name]["mean_perplexity"] <= 1.02 * lora else "does not hold"
        return (f"{verdict} for {name}: {vs(name)} with {ratio:.0f}x fewer trainable parameters, "
                f"i.e. {100 * gain:.0f}% of "
                f"LoRA's perplexity gain over the base model ({base:.3f})")

    return {
        "moslora >= lora": ("holds" if res["moslora"]["mean_perplexity"] <= lora else "does not hold")
        + f": {vs('moslora')}",
        "hiddenkey >= lora": "; ".join(
            ("holds" if res[n]["mean_perplexity"] <= lora else "does not hold") + f" for {n}: {vs(n)}"
            for n in res if n.startswith("lora+hiddenkey")),
        "svfit within 2% of lora with far fewer parameters": "; ".join(svfit(n) for n in res if n.startswith("svfit")),
        "gmt (no direction claimed at this scale)": vs("lora+gmt"),
    }


def markdown(out: dict) -> str:
    res, topics = out["results"], out["config"]["topics"]
    head = ("| variant | " + " | ".join(f"ppl {t}" for t in topics)
            + " | mean ppl | trainable / task | step time vs LoRA (wall, CPU) |")
    lines = [head, "|" + "---|" * (len(topics) + 4)]
    base = res["lora"]["base_perplexity"]
    lines.append("| base model (no adapter) | " + " | ".join(f"{base[t]:.3f}" for t in topics)
                 + f" | {sum(base.values()) / len(base):.3f} | 0 | - |")
    for name, r in res.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['perplexity'][t]:.3f}" for t in topics)
                     + f" | {r['mean_perplexity']:.3f} | {r['trainable_per_task']:,} "
                     f"| {r['step_time_ratio']:.2f}, {r['step_cpu_ratio']:.2f} |")
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
        "per matrix). Step time = median optimiser-step wall time and process CPU time, as ratios to LoRA's in "
        "the same run (the cores were shared with other jobs, so the ratios are noisy; CPU time is the less "
        f"load-sensitive of the two). LoRA's median step: {res['lora']['step_seconds']:.2f} s wall.",
        "",
        *lines,
        "",
        "## Does each paper's direction hold here?",
        "",
        *[f"- **{k}**: {v}" for k, v in out["verdicts"].items()],
        "",
        "## HiddenKey probe",
        "",
        f"The base model alone in training mode, untrained, on 8 held-out {topics[0]} rows: token NLL "
        + ", ".join(f"{k} {v:.3f}" for k, v in out["hiddenkey_probe"]["nll"].items())
        + f" (rate {out['hiddenkey_probe']['rate']}). Its FFN outputs reach |x| = "
        f"{out['hiddenkey_probe']['ffn_output_abs_max']:.0f} against a median of "
        f"{out['hiddenkey_probe']['ffn_output_abs_median']:.2f}: element-wise HiddenCut drops or rescales these "
        "massive activations, so the model trained under it is far from the one evaluated without it.",
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
    # One thread: with other jobs on the same 2 cores, two OpenMP threads per process made a training
    # step ~4x slower in wall time (and ~4x more CPU time) than one thread, measured on this machine.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = p.parse_args(argv)
    args.topics = args.topics.split(",")
    variants = args.variants.split(",")
    if "lora" not in variants:
        p.error("--variants must include lora (the reference for ratios)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-variants.") as tmp:
        for v in variants:
            results[v] = run_variant(registry(Path(tmp), v, args))
            print(f"{v}: {json.dumps(results[v])}", file=sys.stderr, flush=True)
        probe = hiddenkey_probe(registry(Path(tmp), "probe", args))
    for r in results.values():
        r["step_time_ratio"] = r["step_seconds"] / results["lora"]["step_seconds"]
        r["step_cpu_ratio"] = r["step_cpu_seconds"] / results["lora"]["step_cpu_seconds"]
    out = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["bench/variants.py", *(argv or sys.argv[1:])]),
        "machine": f"{len(os.sched_getaffinity(0))} CPU cores (nproc), {platform.machine()}, torch {torch.__version__} "
                   f"with {torch.get_num_threads()} threads",
        "date": datetime.date.today().isoformat(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "variants")},
        "results": results,
        "hiddenkey_probe": probe,
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
