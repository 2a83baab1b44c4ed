"""Exploration (session 17): the product's fit and calibration (hub/router_fit.py) on the features of
pooling_feats.py, per layer, pooling and layer combination. Prints one JSON line per candidate and hub:
validation accuracy (the choice is made on it), then test select accuracy, false fallback, OOD recall, openings.

    python bench/router_study/pooling_analyse.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hub.router import Router  # noqa: E402
from hub.router_fit import RouterConfig, _fit_softmax, _temperature, fallback_thresholds  # noqa: E402


def features(part: dict, layers: tuple[int, ...], pool: str) -> torch.Tensor:
    fs = [part["feats"][(L, pool)] for L in layers]
    return torch.cat(fs, 1)


def run(hub: dict, layers: tuple[int, ...], pool: str, cfg: RouterConfig) -> dict:
    tasks = hub["tasks"]
    y = {k: torch.tensor([tasks.index(t) if t in tasks else -1 for t in hub[k]["labels"]])
         for k in ("train", "val", "test", "openings")}
    e = {k: features(hub[k], layers, pool) for k in ("train", "val", "test", "ood", "openings")}
    mean, std = e["train"].mean(0), e["train"].std(0, unbiased=False).clamp(min=1e-6)
    z = (e["train"] - mean) / std
    W, b = _fit_softmax(z, y["train"], len(tasks), cfg.l2)
    cent = torch.stack([z[y["train"] == i].mean(0) for i in range(len(tasks))])
    counts = torch.bincount(y["train"], minlength=len(tasks)).float()
    r = Router(tasks, {"mean": mean, "std": std, "W": W, "b": b, "centroids": cent, "prior": counts / counts.sum()},
               {"temperature": 1.0})
    r.meta["temperature"] = _temperature(r.logits(r.standardise(e["val"])), y["val"])
    ood_t, en_t = fallback_thresholds(r.ood_scores(e["val"]), r.energy(e["val"]), cfg.fallback_budget,
                                      cfg.far_share, cfg.budget_confidence)

    def fell(x):
        return (r.ood_scores(x) > ood_t) | (r.energy(x) > en_t)

    def acc(k):
        return float((r.probs(e[k]).argmax(1) == y[k]).float().mean())

    out = {"layers": layers, "pool": pool, "val_acc": round(acc("val"), 4), "test_acc": round(acc("test"), 4),
           "test_ff": round(float(fell(e["test"]).float().mean()), 4),
           "ood_recall": round(float(fell(e["ood"]).float().mean()), 4)}
    if len(y["openings"]):
        out["open_acc"] = round(acc("openings"), 4)
        out["open_ff"] = round(float(fell(e["openings"]).float().mean()), 4)
    return out


def main() -> None:
    torch.set_num_threads(2)
    data = torch.load("/tmp/rt2/feats.pt", weights_only=False)
    cfg = RouterConfig()
    cands = [((L,), p) for p in ("mean", "skip0", "rms_skip0") for L in (4, 6, 8, 10, 12)]
    cands += [(c, p) for p in ("mean", "skip0", "rms_skip0") for c in ((4, 8), (6, 8), (4, 6, 8), (8, 12))]
    for layers, pool in cands:
        row = {name: run(hub, layers, pool, cfg) for name, hub in data.items()}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
