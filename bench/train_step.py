"""Training-step cost of the joint multi-task BoRA step, against PEFT on the same batch.

Variants, timed interleaved in one run (the order rotated every repeat; medians and minima of --repeats, after
one warm-up step each; the machine's noise only adds time, so the minima are the least disturbed figures):
  borahub      joint step over 8 tasks in one mixed batch: Pyro model + AutoDelta guide, Adam
  borahub_torch the same stacked model with the prior written as a plain-torch penalty (Pyro overhead)
  peft_single  one PEFT LoRA adapter (same rank and targets) on the same batch
  peft_loop    PEFT with 8 adapters, a forward/backward per task after set_adapter (the BoRA reference style)

    python bench/train_step.py [--model smollm2-135m] [--rows 8] [--length 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.peft_twins import peft_multi, per_task_loop  # noqa: E402
from models.base import load_base  # noqa: E402
from models.bora import BoraPrior, plain_penalty  # noqa: E402
from models.multitask import MultiTaskModel  # noqa: E402
from tasks.schema import ALL_PROJECTIONS, AdapterSpec  # noqa: E402

TASKS = 8


def make_batch(tok, rows: int, length: int) -> dict:
    from tasks.data import bbc_news_folder

    texts = [p.read_text(errors="replace") for p in sorted((bbc_news_folder() / "tech").glob("*.txt"))[:rows]]
    enc = tok(texts, max_length=length, truncation=True, padding="max_length", return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels,
            "task_ids": torch.arange(rows) % TASKS}


def borahub_steps(name: str, spec: AdapterSpec, batch: dict):
    lm, tok = load_base(name)
    mtm = MultiTaskModel(lm, tok, name, [(f"t{i}", spec) for i in range(TASKS)]).train()
    init = mtm.init_params(0)
    sizes = torch.full((TASKS,), 100.0)
    prior = BoraPrior(mtm, 1000.0, sizes, init)
    pyro.enable_validation(False)  # as the Trainer does
    prior.loss(batch)
    opt = torch.optim.Adam(list(prior.parameters()), lr=1e-3)

    def pyro_step():
        opt.zero_grad()
        prior.loss(batch).backward()
        opt.step()

    g = mtm.groups[0]
    theta0, Theta0 = init[g.key]
    delta, Theta = torch.nn.Parameter(theta0 - Theta0), torch.nn.Parameter(Theta0.clone())
    opt2 = torch.optim.Adam([delta, Theta], lr=1e-3)

    def torch_step():  # the same non-centred model as BoraPrior at 0 < tau < inf, written by hand
        opt2.zero_grad()
        g.flat = torch.cat([delta, delta.new_zeros(1, g.dim)]) + Theta
        nll, ntok = mtm.row_nll(batch)
        t = batch["task_ids"]
        scale = sizes[t] / torch.bincount(t, minlength=TASKS)[t]
        loss = (scale * nll / ntok).sum() + plain_penalty(delta, 1000.0)
        loss.backward()
        opt2.step()

    return pyro_step, torch_step


def peft_steps(name: str, spec: AdapterSpec, batch: dict):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=spec.target_modules, lora_dropout=0.0)

    def lm_loss(model, b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), b["labels"][:, 1:], ignore_index=-100)

    single = get_peft_model(load_base(name)[0], cfg).train()
    opt1 = torch.optim.Adam([p for p in single.parameters() if p.requires_grad], lr=1e-3)

    def single_step():
        opt1.zero_grad()
        lm_loss(single, batch).backward()
        opt1.step()

    multi = peft_multi(load_base(name)[0], cfg, TASKS).train()
    loop_step = per_task_loop(multi, batch, TASKS, lm_loss, 1e-3)

    return single_step, loop_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="docs/results/train_step.json")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = AdapterSpec(rank=args.rank, alpha=2 * args.rank, target_modules=list(ALL_PROJECTIONS))
    _, tok = load_base(args.model)
    batch = make_batch(tok, args.rows, args.length)
    pyro_step, torch_step = borahub_steps(args.model, spec, batch)
    single_step, loop_step = peft_steps(args.model, spec, batch)
    steps = {"borahub": pyro_step, "borahub_torch": torch_step, "peft_single": single_step, "peft_loop": loop_step}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for fn in steps.values():
        fn()  # warm-up
    names = list(steps)
    for r in range(args.repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    device = "cuda:" + torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "date": datetime.date.today().isoformat(),
        "setup": {"model": args.model, "tasks": TASKS, "rows": args.rows, "tokens_per_row": args.length,
                  "rank": args.rank, "targets": spec.target_modules, "repeats": args.repeats},
        "median_seconds": med,
        "ratio_joint_vs_peft_single": med["borahub"] / med["peft_single"],
        "ratio_joint_vs_peft_loop": med["borahub"] / med["peft_loop"],
        "pyro_overhead_vs_torch_penalty": med["borahub"] / med["borahub_torch"] - 1,
        "min_seconds": low,
        "min_ratio_joint_vs_peft_single": low["borahub"] / low["peft_single"],
        "min_ratio_joint_vs_peft_loop": low["borahub"] / low["peft_loop"],
        "min_pyro_overhead_vs_torch_penalty": low["borahub"] / low["borahub_torch"] - 1,
        "seconds": times,
        "goals": {"ratio_joint_vs_peft_single": "<= 1.10", "ratio_joint_vs_peft_loop": "<= 0.7 on a GPU",
                  "pyro_overhead_vs_torch_penalty": "<= 0.05"},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = ["# Training step: joint 8-task BoRA vs PEFT\n", f"Command: `{result['command']}`  ",
          f"Machine: {result['machine']}; date {result['date']}\n", "| variant | median step (s) | min step (s) |",
          "|---|---|---|"]
    md += [f"| {k} | {v:.3f} | {low[k]:.3f} |" for k, v in med.items()]
    md += ["", "Ratios of medians (of minima in brackets):", "",
           f"- joint / PEFT single adapter: **{result['ratio_joint_vs_peft_single']:.3f}** "
           f"({result['min_ratio_joint_vs_peft_single']:.3f}) (goal <= 1.10)",
           f"- joint / PEFT per-task loop: **{result['ratio_joint_vs_peft_loop']:.3f}** "
           f"({result['min_ratio_joint_vs_peft_loop']:.3f}) (goal <= 0.7 on a GPU)",
           f"- Pyro prior overhead vs plain-torch penalty: **{100 * result['pyro_overhead_vs_torch_penalty']:+.1f}%** "
           f"({100 * result['min_pyro_overhead_vs_torch_penalty']:+.1f}%) (goal <= 5%)"]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
