"""The GPU check: training-step and mixed-batch costs on one GPU, against PEFT, in bf16.

Run it whenever a GPU is available (under 8 minutes on one H100/H200); it writes docs/results/gpu_check.{json,md}
and docs/results/mixed_batch_gpu.json. Models: a Llama-3-8B-shaped model with random weights (timing needs no
download) and the embedded SmolLM2-135M. Parts, each timed with CUDA events after a warm-up, medians of --reps:
  train   one optimiser step on a batch mixing 8 tasks: ours (BoRA joint step through models/trainer.py, on an
          accelerate Accelerator with bf16 autocast) vs one PEFT LoRA adapter on the same batch vs PEFT with 8
          adapters and a forward/backward per task (set_adapter); goal: ours <= 0.7x the PEFT loop
  forward one forward of a mixed batch whose rows use 1 / 8 / 64 adapters: ours vs the base model alone vs PEFT's
          mixed-batch path (adapter_names=); goal: ours <= 1.10x the base at 64 adapters
  bf16    the joint step's tokens/s in bf16 and in fp32 (SmolLM2)
All adapters are rank 8 on every attention and MLP projection. ``--smoke`` runs every part on a tiny
Llama-shaped model (any device, CPU included) so the script itself is tested where no GPU is.

    python bench/gpu_check.py [--reps 10] [--smoke] [--out docs/results]
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.peft_twins import copy_group_into, peft_multi, per_task_loop  # noqa: E402
from models import device as device_mod  # noqa: E402
from models.base import load_base, prepare  # noqa: E402
from models.bora import BoraPrior  # noqa: E402
from models.multitask import MultiTaskModel  # noqa: E402
from models.trainer import Trainer  # noqa: E402
from tasks.schema import ALL_PROJECTIONS, AdapterSpec  # noqa: E402

TASKS, RANK = 8, 8
LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256}


def timer(dev: torch.device):
    """Seconds of one call, CUDA-synchronised on a GPU."""
    def run(fn) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t
    return run


def median_times(fns: dict, reps: int, dev: torch.device) -> dict[str, float]:
    """Interleaved repetitions (order rotated each time) after one warm-up call each; medians."""
    run, names = timer(dev), list(fns)
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for r in range(reps):
        for k in names[r % len(names):] + names[: r % len(names)]:
            times[k].append(run(fns[k]))
    return {k: statistics.median(v) for k, v in times.items()}


def random_llama(shape: dict, dtype: torch.dtype, dev: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(dev):
        lm = LlamaForCausalLM(LlamaConfig(**shape, pad_token_id=0, bos_token_id=1, eos_token_id=2)).to(dtype)
    prepare(lm, None)
    return lm


def base_model(name: str, dtype: torch.dtype, dev: torch.device):
    if name == "smollm2-135m":
        return load_base(name, dtype=dtype, device=dev)[0]
    return random_llama(LLAMA3_8B if name == "llama3-8b-shaped" else TINY, dtype, dev)


def spec() -> AdapterSpec:
    return AdapterSpec(rank=RANK, alpha=2 * RANK, target_modules=list(ALL_PROJECTIONS))


def lm_batch(vocab: int, rows: int, length: int, dev: torch.device) -> dict:
    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(0)).to(dev)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "task_ids": (torch.arange(rows) % TASKS).to(dev)}


class FixedBatches:
    def __init__(self, batch: dict):
        self.b, self.batch_size = {k: v.cpu() for k, v in batch.items()}, len(batch["task_ids"])

    def batch(self, step: int, micro: int = 0) -> dict:
        return self.b


def joint_step(lm, batch: dict, precision: str, dev: torch.device):
    """One Trainer step of the BoRA joint model over TASKS tasks (what `borahub train` runs)."""
    mtm = MultiTaskModel(lm, None, "bench", [(f"t{i}", spec()) for i in range(TASKS)])
    init = {k: (a.to(dev), b.to(dev)) for k, (a, b) in mtm.init_params(0).items()}
    prior = BoraPrior(mtm, 100.0, torch.full((TASKS,), 100.0), init)
    trainer = Trainer(prior, FixedBatches(batch), steps=10**6, lr=1e-4, seed=0,
                      accelerator=device_mod.accelerator(dev, precision, 1))
    mtm.train()
    return trainer.train_step


def peft_steps(lm, batch: dict, dev: torch.device, autocast: bool):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(ALL_PROJECTIONS), lora_dropout=0.0)

    def loss(model, b):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), b["labels"][:, 1:])

    single = get_peft_model(copy.deepcopy(lm), cfg).train()
    opt1 = torch.optim.Adam([p for p in single.parameters() if p.requires_grad], lr=1e-4)

    def single_step():
        opt1.zero_grad()
        loss(single, batch).backward()
        opt1.step()

    multi = peft_multi(copy.deepcopy(lm), cfg, TASKS).train()
    loop_step = per_task_loop(multi, batch, TASKS, loss, 1e-4)

    return single_step, loop_step, (single, multi)


def train_part(name: str, args, dev: torch.device) -> dict:
    lm = base_model(name, torch.bfloat16, dev)
    batch = lm_batch(lm.config.vocab_size, args.train_rows, args.train_length, dev)
    single, loop, keep = peft_steps(lm, batch, dev, autocast=True)
    ours = joint_step(lm, batch, "bf16", dev)
    t = median_times({"ours_joint": ours, "peft_single": single, "peft_loop": loop}, args.reps, dev)
    del keep
    return {"rows": args.train_rows, "length": args.train_length, "tasks": TASKS, "median_s": t,
            "joint_vs_peft_loop": t["ours_joint"] / t["peft_loop"],
            "joint_vs_peft_single": t["ours_joint"] / t["peft_single"]}


def forward_part(name: str, args, dev: torch.device) -> dict:
    from peft import LoraConfig

    base = base_model(name, torch.bfloat16, dev)
    n = max(args.counts)
    mtm = MultiTaskModel(copy.deepcopy(base), None, "bench", [(f"t{i}", spec()) for i in range(n)])
    g = mtm.groups[0]
    flat = 0.02 * torch.randn(g.flat.shape, generator=torch.Generator().manual_seed(1))
    mtm.set_params({g.key: (flat[:-1], flat[-1])})
    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(ALL_PROJECTIONS), lora_dropout=0.0,
                     init_lora_weights=False)
    pm = peft_multi(copy.deepcopy(base), cfg, n)
    copy_group_into(pm, g, n)  # the same adapters in PEFT
    pm.eval()
    batch = lm_batch(base.config.vocab_size, args.rows, args.tokens, dev)
    ids, mask, rows = batch["input_ids"], batch["attention_mask"], torch.arange(args.rows, device=dev)
    fns = {"base": lambda: base(input_ids=ids, attention_mask=mask, use_cache=False)}
    for u in args.counts:
        def ours(u=u):
            with mtm.routed(rows % u):
                mtm.lm(input_ids=ids, attention_mask=mask, use_cache=False)
        names = [f"t{i % u}" for i in range(args.rows)]
        fns[f"ours_{u}"] = ours
        fns[f"peft_{u}"] = lambda names=names: pm(input_ids=ids, attention_mask=mask, use_cache=False,
                                                  adapter_names=names)
    with torch.no_grad():
        with mtm.routed(rows % n):
            a = mtm.lm(input_ids=ids, attention_mask=mask).logits.float()
        b = pm(input_ids=ids, attention_mask=mask, adapter_names=[f"t{i % n}" for i in range(args.rows)]).logits
        diff = float((a - b.float()).abs().max() / b.float().abs().max())
        t = median_times(fns, args.reps, dev)
    table = [{"adapters": u, "base_s": t["base"], "ours_s": t[f"ours_{u}"], "peft_s": t[f"peft_{u}"],
              "ours_vs_base": t[f"ours_{u}"] / t["base"], "ours_vs_peft": t[f"ours_{u}"] / t[f"peft_{u}"]}
             for u in args.counts]
    return {"rows": args.rows, "tokens": args.tokens, "rank": RANK, "dtype": "bf16", "table": table,
            "ours_vs_peft_rel_logit_diff": diff}


def bf16_part(name: str, args, dev: torch.device) -> dict:
    out = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        lm = base_model(name, dtype, dev)
        batch = lm_batch(lm.config.vocab_size, args.train_rows, args.train_length, dev)
        step = joint_step(lm, batch, precision, dev)
        out[f"{precision}_tokens_per_s"] = args.train_rows * args.train_length / median_times({"s": step},
                                                                                               args.reps, dev)["s"]
        del lm, step
    out["bf16_vs_fp32"] = out["bf16_tokens_per_s"] / out["fp32_tokens_per_s"]
    return out


def write_md(res: dict, path: Path) -> None:
    lines = ["# GPU check", "", f"Command: `{res['command']}`  ", f"Device: {res['device']}; date: {res['date']}", ""]
    for name, r in res["models"].items():
        tr, fw = r["train"], r["forward"]
        lines += [f"## {name}", "",
                  f"Training step, {tr['rows']} rows x {tr['length']} tokens mixing {tr['tasks']} tasks (bf16 "
                  "autocast): " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in tr["median_s"].items()) +
                  f"; joint / PEFT loop **{tr['joint_vs_peft_loop']:.3f}** (goal <= 0.7), joint / PEFT single "
                  f"{tr['joint_vs_peft_single']:.3f}.", "",
                  f"Mixed-batch forward, {fw['rows']} rows x {fw['tokens']} tokens, bf16 (ours vs PEFT logits: "
                  f"relative max diff {fw['ours_vs_peft_rel_logit_diff']:.1e}):", "",
                  "| adapters | base ms | ours ms | PEFT ms | ours / base | ours / PEFT |",
                  "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {x['adapters']} | {x['base_s'] * 1000:.1f} | {x['ours_s'] * 1000:.1f} | {x['peft_s'] * 1000:.1f} "
                  f"| {x['ours_vs_base']:.3f} | {x['ours_vs_peft']:.3f} |" for x in fw["table"]]
        if "bf16" in r:
            b = r["bf16"]
            lines += ["", f"Joint step throughput: fp32 {b['fp32_tokens_per_s']:.0f} tokens/s, bf16 "
                      f"{b['bf16_tokens_per_s']:.0f} tokens/s ({b['bf16_vs_fp32']:.2f}x)."]
        lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--train-rows", type=int, default=8)
    ap.add_argument("--train-length", type=int, default=256)
    ap.add_argument("--counts", default="1,8,64")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, any device: checks the script runs")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args()
    args.counts = [int(c) for c in args.counts.split(",")]
    dev = device_mod.resolve_device("auto")
    if dev.type != "cuda" and not args.smoke:
        raise SystemExit("gpu_check: no CUDA device here (use --smoke to check the script on this machine)")
    if args.smoke:
        args.reps, args.rows, args.tokens, args.train_rows, args.train_length = 2, 8, 16, 8, 16
    models = ["tiny-llama"] if args.smoke else ["llama3-8b-shaped", "smollm2-135m"]
    res = {"command": "python bench/gpu_check.py " + " ".join(sys.argv[1:]), "date": dt.date.today().isoformat(),
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev), "models": {}}
    for name in models:
        r = {"train": train_part(name, args, dev), "forward": forward_part(name, args, dev)}
        if name != "llama3-8b-shaped":  # fp32 training of 8B is not what a GPU user runs
            r["bf16"] = bf16_part(name, args, dev)
        res["models"][name] = r
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({name: r}, indent=2), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    (out / "mixed_batch_gpu.json").write_text(json.dumps(
        {"command": res["command"], "device": res["device"], "date": res["date"],
         "models": {n: r["forward"] for n, r in res["models"].items()}}, indent=2))
    write_md(res, out / "gpu_check.md")


if __name__ == "__main__":
    main()
