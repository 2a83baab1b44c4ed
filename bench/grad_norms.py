"""Per-step training NLL and gradient norm of one registry's run: the trace that shows a diverging run's spike.

Trains the registry as `borahub train` would (its own store), reading each step's global gradient norm before any
clipping (training.max_grad_norm unset: nothing is clipped, the run is the plain one), and prints one JSON object:
the steps' NLL and norm, the test perplexity per task, and the settings.

    python bench/bora_sweep.py --data bbc --grid shared --seeds 0   # writes .borahub/bora_sweep/bbc/seed0/tasks.yaml
    python bench/grad_norms.py .borahub/bora_sweep/bbc/seed0/tasks.yaml --tau shared [--max-grad-norm 50]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def trace(config: Path, tau=None, max_grad_norm: float | None = None, store: Path | None = None) -> dict:
    from hub.workspace import Workspace

    ws = Workspace(config)
    ws.cfg.training.max_grad_norm = max_grad_norm or float("inf")  # inf: the norm is read, nothing is scaled
    ws.store = store or ws.store.parent / "store-grad-norms"
    steps, t0 = [], time.perf_counter()

    def traced(trainer, nll: float, _seconds: float) -> None:
        steps.append({"step": trainer.step, "nll": nll, "grad_norm": trainer.last_grad_norm})

    report = ws.train(tau=tau, progress=False, fit_router=False, on_step=traced)
    res = ws.evaluate(split="test")
    return {"config": str(config), "tau": tau, "max_grad_norm": max_grad_norm, "lr": ws.cfg.training.lr,
            "clipped_steps": report.clipped_steps if max_grad_norm else 0, "seconds": time.perf_counter() - t0,
            "perplexity": {n: r["perplexity"] for n, r in res.items()}, "steps": steps}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", type=Path)
    p.add_argument("--tau", default=None, help="number, shared (default: the registry's)")
    p.add_argument("--max-grad-norm", type=float, default=None, help="clip at this norm (default: no clipping)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tau = args.tau if args.tau in (None, "shared") else float(args.tau)
    out = trace(args.config, tau, args.max_grad_norm)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
