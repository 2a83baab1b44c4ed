"""A decode step of a mixed-task generation: ROWS rows x 1 token on the embedded SmolLM2-135M, rows spread
round-robin over 1, 8 and 64 rank-8 LoRA adapters on every projection, routed once and then stepped repeatedly
as a generation does. Ours by default (the rows' distinct adapters applied as one wide LoRA where
``union_pays``, else each row's gathered copy, kept across steps), with the per-row path forced (``per-row``),
and regathering every step (``gather_cache_bytes = 0``), each against the base model's forward; interleaved
repetitions, medians and minima. No KV cache: the adapted projections are what differs, and they see the same
shapes.

    python bench/decode_step.py [--rows 64] [--counts 1,8,64] [--reps 30] [--threads 2] [--precision fp32]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixed_batch import random_adapters  # noqa: E402  (bench/ is this script's own folder on sys.path)
from models.allocator import retain_freed_memory  # noqa: E402
from models.base import load_base  # noqa: E402
from models.device import DTYPES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--counts", default="1,8,64")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="the base model's precision")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    torch.set_num_threads(args.threads)
    malloc = "retained" if retain_freed_memory() else "system default"
    dtype = DTYPES[args.precision]
    mtm = random_adapters(max(counts), rank=8, seed=0, dtype=dtype)
    base, _ = load_base("smollm2-135m", dtype=dtype)
    ids = torch.randint(100, base.config.vocab_size, (args.rows, 1), generator=torch.Generator().manual_seed(1))
    budget = mtm.stack.gather_cache_bytes

    def ours(u: int, reuse: bool, union: bool = True):
        def f():
            mtm.stack.gather_cache_bytes = budget if reuse else 0
            mtm.stack.union_decode = union
            with mtm.routed(torch.arange(args.rows) % u):  # one Routing for both steps
                mtm.lm(input_ids=ids, use_cache=False)  # the first step (gathers)
                t = time.perf_counter()
                mtm.lm(input_ids=ids, use_cache=False)  # a later step, timed
                return time.perf_counter() - t
        return f

    def plain():
        t = time.perf_counter()
        base(input_ids=ids, use_cache=False)
        return time.perf_counter() - t

    configs = {"base": plain}
    for u in counts:
        configs[f"reuse_{u}"] = ours(u, True)
        configs[f"rows_{u}"] = ours(u, True, union=False)
        configs[f"regather_{u}"] = ours(u, False, union=False)
    times = {k: [] for k in configs}
    names = list(configs)
    with torch.no_grad():
        for f in configs.values():
            f()
        for r in range(args.reps):
            for k in names[r % len(names):] + names[: r % len(names)]:
                times[k].append(configs[k]())
    mtm.stack.gather_cache_bytes = budget
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    table = [{"adapters": u, "base_ms": 1e3 * med["base"], "reuse_ms": 1e3 * med[f"reuse_{u}"],
              "rows_ms": 1e3 * med[f"rows_{u}"], "regather_ms": 1e3 * med[f"regather_{u}"],
              "reuse_vs_base": med[f"reuse_{u}"] / med["base"], "rows_vs_base": med[f"rows_{u}"] / med["base"],
              "regather_vs_base": med[f"regather_{u}"] / med["base"],
              "min_reuse_vs_base": low[f"reuse_{u}"] / low["base"], "min_rows_vs_base": low[f"rows_{u}"] / low["base"],
              "min_regather_vs_base": low[f"regather_{u}"] / low["base"]} for u in counts]
    res = {"command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
           "date": dt.date.today().isoformat(), "threads": args.threads, "precision": args.precision,
           "malloc": malloc, "rows": args.rows,
           "reps": args.reps, "table": table, "times_s": times}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "decode_step" if args.precision == "fp32" else f"decode_step_{args.precision}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    lines = ["# Decode step of a mixed-task generation", "", f"Command: `{res['command']}`  ",
             f"{os.cpu_count()} CPU cores, torch threads {args.threads}, {args.precision}, freed memory {malloc}, "
             f"{res['date']}; "
             f"{args.rows} rows x 1 token, medians of {args.reps} interleaved repetitions (minima beside).", "",
             "| adapters | base ms | default ms | per-row ms | regather ms | default / base | per-row / base "
             "| regather / base | min default / base | min per-row / base | min regather / base |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['adapters']} | {r['base_ms']:.1f} | {r['reuse_ms']:.1f} | {r['rows_ms']:.1f} | "
              f"{r['regather_ms']:.1f} | {r['reuse_vs_base']:.3f} | {r['rows_vs_base']:.3f} | "
              f"{r['regather_vs_base']:.3f} | {r['min_reuse_vs_base']:.3f} | {r['min_rows_vs_base']:.3f} | "
              f"{r['min_regather_vs_base']:.3f} |" for r in table]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "times_s"}, indent=2))


if __name__ == "__main__":
    main()
