"""Fitting and calibrating the router: the classifier, its temperature and the fallback thresholds (the
method and the measurements behind the defaults are in hub/router.py's docstring)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from models.multitask import MultiTaskModel

from .embedding import embed, layers_for
from .route import RouterError
from .router import Router


@dataclass
class RouterConfig:
    """Fit settings; the reason beside each default."""

    depth: float = 0.25  # share of decoder layers run: 2 points below the last layer on BBC News, ~3x cheaper
    taps: tuple[float, ...] = (0.5, 0.75, 1.0)  # of that depth, the layers read (concatenated): free, +0.4-0.8 points
    max_tokens: int = 64  # the router reads a prompt's first 64 tokens (a headline and a sentence or two)
    max_docs: int = 1000  # inputs per task for the fit: HWU64 gains 0.5-2 points from 200 to ~500 (router_study.md)
    l2: float = 1e-3  # ridge on the standardised weights; BBC validation accuracy is flat in 1e-4..3e-3
    fallback_budget: float = 0.05  # share of in-distribution (validation) inputs the fallback mode may send to Theta
    budget_confidence: float = 0.9  # ... held with this probability over the validation draw (0: on average)
    far_share: float = 0.2  # of that budget, for the distance test (1% of inputs); the rest for the energy score
    short_views: bool = True  # also fit and calibrate on the opening words of long inputs (length-robust scores)
    target_accuracy: float = 0.97  # --bayes only: routing accuracy required above its confidence threshold
    bayes_docs: int = 0  # validation inputs per task to calibrate the Bayesian scorer (each costs T forwards)
    batch_size: int = 16  # prompts per embedding forward


def _fit_softmax(z: Tensor, y: Tensor, n_classes: int, l2: float) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression by full-batch LBFGS: weights (T, D), bias (T,)."""
    W = torch.zeros(n_classes, z.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ W.T + b, y) + l2 * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return W.detach(), b.detach()


def _temperature(logits: Tensor, y: Tensor) -> float:
    """The temperature minimising validation NLL, on a log grid from 0.05 to 20."""
    grid = torch.logspace(math.log10(0.05), math.log10(20.0), 121)
    nll = torch.stack([F.cross_entropy(logits / t, y) for t in grid])
    return float(grid[int(nll.argmin())])


SHORT_MIN, SHORT_MAX, LONG = 8, 24, 32  # words: a short view of an input longer than LONG keeps 8 to 24 of them


def short_views(items: list[tuple[str, str]], seed: int, shortest: int = SHORT_MIN) -> list[tuple[str, str]]:
    """(task, opening words: ``shortest`` to SHORT_MAX of them) of every input longer than LONG words: a headline or
    a sentence, as users send to a hub of documents. Without them the distance test reads length as novelty: fitted
    on whole articles, it sent short news requests of a known topic to Theta (docs/results/router_demo.md,
    router.md). Deterministic per seed."""
    import random

    rng = random.Random(seed)
    out = []
    for task, text in items:
        words = text.split()
        if len(words) > LONG:
            out.append((task, " ".join(words[: rng.randint(shortest, SHORT_MAX)])))
    return out


def allowed_above(n: int, budget: float, confidence: float | None = None) -> int:
    """How many of n calibration inputs may lie above the thresholds. With a new in-distribution input
    exchangeable with them, k above make its fallback probability (k + 1) / (n + 1) on average over the
    calibration draw (the conformal bound: k <= budget (n + 1) - 1). With ``confidence``, the fallback rate
    itself (distributed as Beta(k + 1, n - k)) must stay <= budget with that probability: the largest k with
    P(Binomial(n, budget) >= k + 1) >= confidence."""
    if not confidence:
        return max(0, math.floor(budget * (n + 1) - 1 + 1e-9))
    if budget <= 0:
        return 0
    logs = [math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * math.log(budget)
            + (n - j) * math.log1p(-budget) for j in range(n + 1)]
    tail = 0.0  # P(Binomial >= j), accumulated from the top
    for j in range(n, 0, -1):
        tail += math.exp(logs[j])
        if tail >= confidence:
            return j - 1
    return 0


def fallback_thresholds(dist: Tensor, energy: Tensor, budget: float, far_share: float,
                        confidence: float | None = None) -> tuple[float, float]:
    """(distance threshold, energy threshold) such that a new in-distribution input falls back (scores above
    either) with probability at most ``budget`` (``allowed_above``: on average, or with probability
    ``confidence``). The distance test takes a ``far_share`` of the inputs allowed above (the most distant), the
    energy test the highest-energy others."""
    n = len(dist)
    allowed = allowed_above(n, budget, confidence)
    sorted_d = dist.sort(descending=True).values
    far_t = float(sorted_d[min(n - 1, math.floor(far_share * allowed + 1e-9))])  # at most that many above it
    far = dist > far_t
    order = energy.argsort(descending=True)
    # unions[k]: inputs falling back when the k highest energies are above the threshold
    unions = far.sum() + torch.cat([torch.zeros(1, dtype=torch.long), (~far[order]).long().cumsum(0)])
    ok = (unions <= allowed).nonzero()
    k = int(ok.max()) if len(ok) else 0
    sorted_e = energy[order]
    if k == 0:
        return far_t, float(sorted_e[0])  # nothing is above the highest energy
    if k < n and sorted_e[k] == sorted_e[k - 1]:  # a tie at the cut: keep the tied inputs (stay in budget)
        return far_t, float(sorted_e[k])
    return far_t, float(sorted_e[k]) if k < n else float(sorted_e[-1]) - 1.0


def confidence_threshold(maxp: Tensor, correct: Tensor, target: float) -> float:
    """The smallest t such that the inputs with max p >= t are routed with accuracy >= ``target``.

    0 when every input may be kept; just above 1 (always unsure) when even the most confident input
    misses the target."""
    order = maxp.argsort(descending=True)
    acc = correct[order].float().cumsum(0) / torch.arange(1, len(order) + 1)
    ok = (acc >= target).nonzero()
    if len(ok) == 0:
        return math.nextafter(1.0, 2.0)
    k = int(ok.max())  # keep the k+1 most confident inputs
    return 0.0 if k == len(order) - 1 else float(maxp[order[k]])


def fit(mtm: MultiTaskModel, train: dict[str, list[str]], validation: dict[str, list[str]],
        cfg: RouterConfig | None = None, progress: bool = False) -> Router:
    """Fit a router on each task's training inputs and calibrate it on its validation inputs.

    ``train``/``validation``: task name -> input texts; tasks without training inputs are left out (they
    are reachable only by an explicit override). With no validation input at all, calibration falls
    back to the training inputs (recorded in ``meta["calibration"]["split"]``).
    """
    from tqdm.auto import tqdm

    cfg = cfg or RouterConfig()
    tasks = [n for n in mtm.task_names if train.get(n)]
    if not tasks:
        raise RouterError("cannot fit a router: no task has training inputs")
    tr = [(t, x) for t in tasks for x in train[t][: cfg.max_docs] if x.strip()]
    va = [(t, x) for t in tasks for x in validation.get(t, [])[: cfg.max_docs] if x.strip()]
    split = "validation" if va else "train"
    va = va or tr
    if cfg.short_views:
        tr, va = tr + short_views(tr, 0), va + short_views(va, 1)
    layers = layers_for(mtm.lm, cfg.depth, cfg.taps)
    bar = tqdm(total=len(tr) + len(va), desc="router", unit="doc", disable=not progress)
    e_tr = embed(mtm, [x for _, x in tr], layers, cfg.max_tokens, cfg.batch_size, bar)
    e_va = embed(mtm, [x for _, x in va], layers, cfg.max_tokens, cfg.batch_size, bar)
    bar.close()
    y_tr = torch.tensor([tasks.index(t) for t, _ in tr])
    y_va = torch.tensor([tasks.index(t) for t, _ in va])

    mean, std = e_tr.mean(0), e_tr.std(0, unbiased=False).clamp(min=1e-6)
    z_tr = (e_tr - mean) / std
    T = len(tasks)
    W, b = _fit_softmax(z_tr, y_tr, T, cfg.l2)
    counts = torch.bincount(y_tr, minlength=T).float()
    deepest = z_tr[:, -(e_tr.shape[1] // len(layers)):]  # the distance test reads the deepest layer (ood_scores)
    centroids = torch.stack([deepest[y_tr == i].mean(0) for i in range(T)])
    tensors = {"mean": mean, "std": std, "W": W, "b": b, "centroids": centroids, "prior": counts / counts.sum()}
    router = Router(tasks, tensors, {"layer": layers[-1], "layers": layers, "max_tokens": cfg.max_tokens,
                                     "temperature": 1.0, "fingerprint": mtm.fingerprint, "config": asdict(cfg)})

    router.meta["temperature"] = _temperature(router.logits(router.standardise(e_va)), y_va)
    p = router.probs(e_va)
    correct = p.argmax(1) == y_va
    ood, energy = router.ood_scores(e_va), router.energy(e_va)
    ood_t, energy_t = fallback_thresholds(ood, energy, cfg.fallback_budget, cfg.far_share, cfg.budget_confidence)
    router.meta["thresholds"] = {"ood": ood_t, "energy": energy_t, "bayes": None}
    far = ood > ood_t
    unsure = (energy > energy_t) & ~far
    kept = ~(far | unsure)
    router.meta["calibration"] = {
        "split": split, "inputs": len(va), "accuracy": float(correct.float().mean()),
        "budget": cfg.fallback_budget, "confidence": cfg.budget_confidence,
        "false_fallback": float((~kept).float().mean()),
        "unsure_rate": float(unsure.float().mean()), "ood_rate": float(far.float().mean()),
        "kept_accuracy": float(correct[kept].float().mean()) if bool(kept.any()) else None,
    }
    if cfg.bayes_docs > 0 and T > 1:
        sub = [i for t in range(T) for i in (y_va == t).nonzero().flatten()[: cfg.bayes_docs].tolist()]
        pb = router.bayes_probs(mtm, [va[i][1] for i in sub], p[sub])
        bmax, bpred = pb.max(1)
        bcorrect = bpred == y_va[sub]
        router.meta["thresholds"]["bayes"] = confidence_threshold(bmax, bcorrect, cfg.target_accuracy)
        router.meta["calibration"]["bayes"] = {"inputs": len(sub), "accuracy": float(bcorrect.float().mean())}
    return router


def fit_from_workspace(ws, mtm: MultiTaskModel, cfg: RouterConfig | None = None, progress: bool = False) -> Router:
    """Fit on the registry's data for the hub's tasks (tasks without a data source are not routable)."""
    train, validation = {}, {}
    for name in mtm.task_names:
        if name in ws.cfg.task_names and ws.cfg.task(name).data is not None:
            d = ws.data(name)
            train[name] = [e.router_text for e in d.train]
            validation[name] = [e.router_text for e in d.validation]
    return fit(mtm, train, validation, cfg, progress)


def fit_and_save(ws, mtm: MultiTaskModel, cfg: RouterConfig | None = None, progress: bool = False) -> Router:
    """Fit the router for a trained hub and write it into the workspace's store."""
    router = fit_from_workspace(ws, mtm, cfg, progress)
    router.save(ws.store)
    return router
