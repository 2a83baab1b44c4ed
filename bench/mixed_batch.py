"""Mixed-task batches: what does it cost when the rows of one forward use different adapters?

Part 1, one forward of ROWS x TOKENS on the embedded SmolLM2-135M, rows spread over 1, 8, 32 and 64
different rank-8 LoRA adapters on every attention and MLP projection:
  - the base model alone (a separate, unwrapped copy),
  - ours: the stacked layer, per-row routing (gather + batched matmul, one pass),
  - PEFT: the same adapters in a PeftModel, forward with ``adapter_names=`` (its mixed-batch path).
Part 2, routed generation against generation with each prompt's task given explicitly (needs a trained
hub with a router: `borahub train`): the router's extra forward is the difference.

All timings of a part are interleaved repetitions in one process. Ratios are given of medians and of minima:
on a shared machine the disturbances only ever add time (a single forward of the base model ranged over
+-25% in one run), so the minimum is the least disturbed estimate and the median the conservative one.

The process keeps freed memory (models/allocator.py) unless BORAHUB_SYSTEM_MALLOC=1: with glibc's default,
every forward page-faults its ~400 MB of fresh activations in again, which costs base and ours alike about
0.5 s and most of the run-to-run noise.

    python bench/mixed_batch.py [--reps 9] [--threads 1]
"""
from __future__ import annotations

import argparse
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

from bench.peft_twins import copy_group_into, peft_multi  # noqa: E402
from models.allocator import retain_freed_memory  # noqa: E402
from models.base import load_base  # noqa: E402
from models.multitask import MultiTaskModel  # noqa: E402
from tasks.schema import ALL_PROJECTIONS, AdapterSpec  # noqa: E402


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def random_adapters(n_adapters: int, rank: int, seed: int, dtype: torch.dtype = torch.float32) -> MultiTaskModel:
    """Our model on the embedded SmolLM2-135M (in ``dtype``) with n random rank-r LoRA adapters on every projection."""
    spec = AdapterSpec(rank=rank, alpha=2 * rank, target_modules=list(ALL_PROJECTIONS))
    lm, tok = load_base("smollm2-135m", dtype=dtype)
    mtm = MultiTaskModel(lm, tok, "smollm2-135m", [(f"t{i}", spec) for i in range(n_adapters)])
    g = mtm.groups[0]
    flat = 0.02 * torch.randn(g.flat.shape, generator=torch.Generator().manual_seed(seed))
    mtm.set_params({g.key: (flat[:-1], flat[-1])})
    return mtm


def build(n_adapters: int, rank: int, seed: int):
    """Our model with n random adapters, a PEFT model with the same adapters, and a plain base copy."""
    from peft import LoraConfig

    mtm = random_adapters(n_adapters, rank, seed)
    g = mtm.groups[0]
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(ALL_PROJECTIONS), lora_dropout=0.0,
                     init_lora_weights=False)
    pm = peft_multi(load_base("smollm2-135m")[0], cfg, n_adapters)
    copy_group_into(pm, g, n_adapters)
    pm.eval()
    base, _ = load_base("smollm2-135m")
    return mtm, pm, base


def profile_extra(base_fn, ours_fn, top: int = 6) -> list[dict]:
    """Self CPU time per op of one forward each (torch.profiler): the ops the adapters add most time to."""
    from torch.profiler import profile

    times = []
    for fn in (base_fn, ours_fn):
        with profile() as prof:
            fn()
        times.append({e.key: (e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()})
    total = sum(t for t, _ in times[0].values())
    rows = [{"op": k, "base_s": times[0].get(k, (0.0, 0))[0], "ours_s": t, "calls_base": times[0].get(k, (0, 0))[1],
             "calls_ours": n} for k, (t, n) in times[1].items()]
    for r in rows:
        r["extra_share_of_base"] = (r["ours_s"] - r["base_s"]) / total
    return sorted(rows, key=lambda r: -r["extra_share_of_base"])[:top]


def forward_part(args) -> dict:
    mtm, pm, base = build(max(args.counts), args.rank, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(100, mtm.lm.config.vocab_size, (args.rows, args.tokens), generator=gen)
    mask = torch.ones_like(ids)
    rows = torch.arange(args.rows)

    def ours(u):
        def f():
            with mtm.routed(rows % u):
                mtm.lm(input_ids=ids, attention_mask=mask, use_cache=False)
        return f

    def peft(u):
        names = [f"t{i % u}" for i in range(args.rows)]
        return lambda: pm(input_ids=ids, attention_mask=mask, use_cache=False, adapter_names=names)

    with torch.no_grad():
        u = max(args.counts)
        with mtm.routed(torch.arange(4) % u):
            a = mtm.lm(input_ids=ids[:4], attention_mask=mask[:4]).logits
        b = pm(input_ids=ids[:4], attention_mask=mask[:4], adapter_names=[f"t{i % u}" for i in range(4)]).logits
        c = base(input_ids=ids[:4], attention_mask=mask[:4]).logits
        check = {"max_abs_diff_ours_vs_peft": float((a - b).abs().max()),
                 "max_abs_diff_ours_vs_base": float((a - c).abs().max()),
                 "max_abs_diff_peft_vs_base": float((b - c).abs().max())}
        configs = {"base": lambda: base(input_ids=ids, attention_mask=mask, use_cache=False)}
        for u in args.counts:
            configs[f"ours_{u}"] = ours(u)
            configs[f"peft_{u}"] = peft(u)
        for f in configs.values():  # warm-up
            f()
        wall = {k: [] for k in configs}
        cpu = {k: [] for k in configs}
        names = list(configs)
        for r in range(args.reps):
            for k in names[r % len(names):] + names[: r % len(names)]:  # rotate the order every repetition
                w, c = timed(configs[k])
                wall[k].append(w)
                cpu[k].append(c)
                print(f"rep {r} {k}: {w:.2f}s", file=sys.stderr, flush=True)
        extra = profile_extra(configs["base"], configs[f"ours_{u}"])
    med = {k: statistics.median(v) for k, v in wall.items()}
    low = {k: min(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    table = []
    for u in args.counts:
        table.append({"adapters": u, "ours_s": med[f"ours_{u}"], "peft_s": med[f"peft_{u}"], "base_s": med["base"],
                      "ours_vs_base": med[f"ours_{u}"] / med["base"],
                      "ours_vs_peft": med[f"ours_{u}"] / med[f"peft_{u}"],
                      "peft_vs_base": med[f"peft_{u}"] / med["base"],
                      "min_ours_vs_base": low[f"ours_{u}"] / low["base"],
                      "min_ours_vs_peft": low[f"ours_{u}"] / low[f"peft_{u}"],
                      "cpu_ours_vs_base": med_cpu[f"ours_{u}"] / med_cpu["base"],
                      "cpu_ours_vs_peft": med_cpu[f"ours_{u}"] / med_cpu[f"peft_{u}"]})
    return {"rows": args.rows, "tokens": args.tokens, "rank": args.rank, "targets": list(ALL_PROJECTIONS),
            "check": check, "table": table, "profile_adapters": u, "extra_ops": extra, "wall_s": wall, "cpu_s": cpu}


def generation_part(args) -> dict:
    from hub.engine import Engine
    from hub.workspace import Workspace

    ws = Workspace(args.config)
    eng = Engine.from_workspace(args.config)
    if eng.router is None:
        raise SystemExit(f"no router in {ws.store}: run `borahub train` (or `borahub router fit`) first")
    per_task = max(1, args.prompts // len(eng.router.tasks))
    prompts, tasks = [], []
    for name in eng.router.tasks:
        for e in ws.data(name).test[:per_task]:
            prompts.append(e.router_text[: args.prompt_chars])
            tasks.append(name)
    kw = {"max_new_tokens": args.new_tokens}
    runs = {"explicit": lambda: eng.generate(prompts, task=tasks, **kw),
            "routed": lambda: eng.generate(prompts, mode="fallback", **kw),
            "route_only": lambda: eng.route(prompts, mode="fallback")}
    for f in runs.values():
        f()
    wall = {k: [] for k in runs}
    names = list(runs)
    for r in range(args.reps):
        for k in names[r % len(names):] + names[: r % len(names)]:
            wall[k].append(timed(runs[k])[0])
            print(f"rep {r} {k}: {wall[k][-1]:.2f}s", file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in wall.items()}
    routes = eng.route(prompts, mode="fallback")
    return {"prompts": len(prompts), "prompt_chars": args.prompt_chars, "new_tokens": args.new_tokens,
            "batch_size": eng.batch_size, "median_s": med, "routed_vs_explicit": med["routed"] / med["explicit"],
            "min_routed_vs_explicit": min(wall["routed"]) / min(wall["explicit"]),
            "routing_share_of_explicit": med["route_only"] / med["explicit"],
            "routed_rows_on_their_task": sum(r.task == t for r, t in zip(routes, tasks)) / len(tasks),
            "wall_s": wall}


def write_md(res: dict, path: Path) -> None:
    f, g = res["forward"], res.get("generation")
    lines = [
        "# Mixed-task batches: cost per adapter count", "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['machine']}; torch threads: {res['threads']}; freed memory: {res['malloc']}; "
        f"date: {res['date']}", "",
        f"One forward of {f['rows']} rows x {f['tokens']} tokens on SmolLM2-135M (logits for every token), "
        f"rank-{f['rank']} LoRA on {', '.join(f['targets'])}; rows spread round-robin over N adapters. "
        f"Medians of {res['reps']} interleaved repetitions (wall clock; ratios of the minima and of CPU-time medians "
        f"beside them). The base forward alone ranged {min(f['wall_s']['base']):.2f}-{max(f['wall_s']['base']):.2f} s "
        "over the repetitions: the machine's noise.", "",
        "| adapters | base s | ours s | PEFT s | ours / base | ours / PEFT | PEFT / base | min: ours / base "
        "| min: ours / PEFT | CPU ours / base |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in f["table"]:
        lines.append(f"| {r['adapters']} | {r['base_s']:.2f} | {r['ours_s']:.2f} | {r['peft_s']:.2f} | "
                     f"{r['ours_vs_base']:.3f} | {r['ours_vs_peft']:.3f} | {r['peft_vs_base']:.3f} | "
                     f"{r['min_ours_vs_base']:.3f} | {r['min_ours_vs_peft']:.3f} | {r['cpu_ours_vs_base']:.3f} |")
    lines += ["", f"Check: ours vs PEFT logits max |diff| {f['check']['max_abs_diff_ours_vs_peft']:.2e} "
              f"(same adapters), ours vs base {f['check']['max_abs_diff_ours_vs_base']:.2e} and PEFT vs base "
              f"{f['check']['max_abs_diff_peft_vs_base']:.2e} (the adapters act).", ""]
    if g:
        lines += ["## Routed generation vs an explicit task", "",
                  f"{g['prompts']} BBC News test prompts (first {g['prompt_chars']} characters, chat template), "
                  f"{g['new_tokens']} new tokens greedy, batch size {g['batch_size']}; medians of {res['reps']} "
                  "interleaved repetitions.", "",
                  "| run | median s |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in g["median_s"].items()]
        lines += ["", f"Routed / explicit: **{g['routed_vs_explicit']:.3f}** (of the minima: "
                  f"{g['min_routed_vs_explicit']:.3f}; routing alone: "
                  f"{g['routing_share_of_explicit']:.3f} of the explicit run); routed rows on their own task: "
                  f"{g['routed_rows_on_their_task']:.2f}.", ""]
    lines += ["## Where the adapters' time goes", "",
              f"torch.profiler, one forward each, base vs ours with {f['profile_adapters']} adapters: the ops whose "
              "self CPU time grows most, as a share of the base forward's total. The frozen matmuls of the adapted "
              "modules run as `addmm_` in ours (accumulating into the adapters' change) and as `mm` in the base, so "
              "those two lines move together; one profiled forward each, as noisy as any single run.", "",
              "| op | calls base / ours | base s | ours s | extra / base total |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['op']} | {r['calls_base']} / {r['calls_ours']} | {r['base_s']:.3f} | {r['ours_s']:.3f} | "
              f"{r['extra_share_of_base']:+.3f} |" for r in f["extra_ops"]]
    lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--counts", default="1,8,32,64", help="adapter counts")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: the cores of this machine are shared; idle pool threads spin)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=str(ROOT / "tasks.yaml"), help="trained hub for the generation part")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-chars", type=int, default=300)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args()
    args.counts = [int(x) for x in args.counts.split(",")]
    torch.set_num_threads(args.threads)
    malloc = "retained (models/allocator.py)" if retain_freed_memory() else "system default"
    env = "BORAHUB_SYSTEM_MALLOC=1 " if malloc == "system default" else ""
    res = {"command": env + "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores ({platform.processor() or 'cpu'})",
           "threads": args.threads, "malloc": malloc, "date": dt.date.today().isoformat(), "reps": args.reps,
           "forward": forward_part(args)}
    if not args.skip_generation:
        res["generation"] = generation_part(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixed_batch.json").write_text(json.dumps(res, indent=2))
    write_md(res, out / "mixed_batch.md")
    print(json.dumps({k: v for k, v in res.items() if k not in ("forward", "generation")} |
                     {"forward": res["forward"]["table"],
                      "generation": {k: v for k, v in res.get("generation", {}).items() if k != "wall_s"}}, indent=2))


if __name__ == "__main__":
    main()
