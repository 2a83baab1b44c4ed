"""Exploration (session 17): 5-fold cross-validated accuracy on the training inputs (8,338 HWU64 requests; 1,779
BBC articles, each fold's articles entering the fit with their short views) for single layers against layers
concatenated or averaged, on pooling_feats.py's features. Larger samples than the validation splits (990 / 446).

    python bench/router_study/taps_cv.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hub.router_fit import _fit_softmax  # noqa: E402

CANDIDATES = [((8,), "cat"), ((6, 8), "cat"), ((4, 8), "cat"), ((4, 6, 8), "cat"), ((4, 6, 8), "avg"),
              ((6, 8), "avg"), ((4, 6, 8, 10, 12), "cat"), ((8, 12), "cat")]


def features(part: dict, layers: tuple[int, ...], how: str) -> torch.Tensor:
    fs = [part["feats"][(layer, "mean")] for layer in layers]
    return torch.cat(fs, 1) if how == "cat" else torch.stack(fs).mean(0)


def predict(x_fit: torch.Tensor, y_fit: torch.Tensor, x: torch.Tensor, n_tasks: int) -> torch.Tensor:
    mean, std = x_fit.mean(0), x_fit.std(0, unbiased=False).clamp(min=1e-6)
    W, b = _fit_softmax((x_fit - mean) / std, y_fit, n_tasks, 1e-3)
    return (((x - mean) / std) @ W.T + b).argmax(1)


def main() -> None:
    torch.set_num_threads(2)
    data = torch.load("/tmp/rt2/feats.pt", weights_only=False)
    for name, hub in data.items():
        tasks, labels = hub["tasks"], hub["train"]["labels"]
        y = torch.tensor([tasks.index(t) for t in labels])
        n = len(y) // 2 if name == "bbc" else len(y)  # BBC: the articles, then their short views in the same order
        if name == "bbc":
            assert labels[:n] == labels[n:2 * n], "short views not aligned with their articles"
        folds = torch.randperm(n, generator=torch.Generator().manual_seed(0)).chunk(5)
        for layers, how in CANDIDATES:
            x = features(hub["train"], layers, how)
            right = views_right = 0
            for fold in folds:
                held = torch.zeros(n, dtype=torch.bool)
                held[fold] = True
                fit = torch.cat([~held, ~held]) if name == "bbc" else ~held
                pred = predict(x[: len(fit)][fit], y[: len(fit)][fit], x[:n][held], len(tasks))
                right += int((pred == y[:n][held]).sum())
                if name == "bbc":
                    pv = predict(x[: len(fit)][fit], y[: len(fit)][fit], x[n:][held], len(tasks))
                    views_right += int((pv == y[n:][held]).sum())
            views = f" views {views_right / n:.4f}" if name == "bbc" else ""
            print(f"{name} {layers} {how} cv acc {right / n:.4f} ({right}/{n}){views}", flush=True)


if __name__ == "__main__":
    main()
