"""Exploration (session 17): a third data set, not used to choose: Banking77's 77 intents as routing classes
(all 10,003 training requests to fit, the 3,080 test requests to score), layer 8 alone against layers 4+6+8 and
6+8, with the router's classifier (standardised features, softmax regression, ridge 1e-3).

    python bench/router_study/taps_banking77.py
"""
from __future__ import annotations

import csv
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.router import DATA, bbc_registry  # noqa: E402
from hub.embedding import embed  # noqa: E402
from hub.router_fit import _fit_softmax  # noqa: E402
from hub.workspace import Workspace  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    rows = {s: list(csv.DictReader((DATA / "banking77" / f"{s}.csv").open(encoding="utf-8"))) for s in ("train", "test")}
    intents = sorted({r["category"] for r in rows["train"]})
    mtm = Workspace(bbc_registry(Path(tempfile.mkdtemp()))[0]).new_model()  # any registry: the default base model
    x = {s: embed(mtm, [r["text"] for r in rows[s]], [4, 6, 8], 64) for s in rows}
    y = {s: torch.tensor([intents.index(r["category"]) for r in rows[s]]) for s in rows}
    d = mtm.lm.config.hidden_size
    for name, cols in (("8", slice(2 * d, 3 * d)), ("4,6,8", slice(0, 3 * d)), ("6,8", slice(d, 3 * d))):
        fit, test = x["train"][:, cols], x["test"][:, cols]
        mean, std = fit.mean(0), fit.std(0, unbiased=False).clamp(min=1e-6)
        W, b = _fit_softmax((fit - mean) / std, y["train"], len(intents), 1e-3)
        acc = float(((((test - mean) / std) @ W.T + b).argmax(1) == y["test"]).float().mean())
        print(f"layers {name}: Banking77 77-intent test accuracy {acc:.4f} (n={len(y['test'])})", flush=True)


if __name__ == "__main__":
    main()
