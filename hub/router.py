"""The router: p(task | prompt) from the frozen base model, and when to fall back to the global Theta.

Fit (at the end of `borahub train`, or `borahub router fit`), per task with data:
  1. embed each training input (``Example.router_text``, what a user would send) with the frozen base
     model, adapters off: the mean over its first ``max_tokens`` tokens of the hidden state after decoder
     layer ``depth * n_layers``, concatenated with the same after the layers at the shares ``taps`` of that
     depth (layers 4, 6 and 8 of SmolLM2's 30). The forward stops at the deepest, so routing costs a
     fraction of a prefill (BBC News test accuracy 0.94 after layer 8, 0.96 after the last, for ~3x the fit
     time: docs/results/router_demo.md), and the shallower layers cost only their pooling (with them,
     5-fold accuracy on the training inputs rose 0.922 -> 0.927 on HWU64, 0.960 -> 0.968 on BBC:
     docs/results/router_study.md);
  2. standardise and fit a multinomial logistic regression (L2, LBFGS): p(task | x);
  3. calibrate on the validation split (never on the data the classifier saw):
     - a temperature for p (validation NLL),
     - the fallback thresholds, to a stated budget of in-distribution inputs sent to Theta
       (``fallback_budget``, default 5%, held with probability ``budget_confidence`` = 0.9 over the draw of
       the validation inputs, not only on average: ``allowed_above``): a share ``far_share`` of the budget goes
       to the distance test (RMS distance to the nearest task centroid over the deepest layer's standardised
       features: inputs unlike every task's inputs, e.g. news articles sent to a hub of short requests), the rest to the
       energy score -T log sum_t exp(logit_t / T) (inputs the classifier has little evidence for, e.g.
       banking questions sent to a hub of assistant domains). Energy, not the top probability: on HWU64
       scenarios with Banking77 as out-of-distribution it caught 50-65% at a 5% budget against 42-59%
       (docs/results/router_study.md), and a confidence threshold set for a target accuracy sent 80% of
       HWU64's in-domain requests to Theta;
     - optionally (``bayes_docs``) a confidence rule (``target_accuracy``) for the Bayesian posterior below.

Modes at inference: ``select`` (top-1), ``blend`` (top-k weighted by p, mixed in output space by the
stacked layer), ``fallback`` (top-1, or Theta when unsure or out of distribution). The Bayesian scorer
replaces p by p(task | x) ∝ p(x | theta_task) p(task), scoring every candidate in one mixed batch.

Length: the distance test's "unlike every task" means unlike the tasks' inputs, length included, so inputs
longer than 32 words also enter the fit and the calibration as their opening 8-24 words (``short_views``): a
hub of documents then takes a headline or a sentence of a known topic as in distribution (without them,
every short BBC request fell back to Theta: docs/results/router_demo.md and router.md).

Files: ``<store>/router.safetensors`` (tensors) and ``<store>/router.json`` (everything else, with the
SHA-256 of the tensors file), each written atomically, tensors first.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from models.base import base_mismatch
from models.multitask import MultiTaskModel
from tasks.atomic import atomic_path, atomic_write_text

from .embedding import embed, log_likelihoods
from .route import GLOBAL_NAME, MODES, SCORERS, Route, RouterError, global_id  # noqa: F401 (re-exported)

ROUTER_JSON, ROUTER_WEIGHTS = "router.json", "router.safetensors"
FORMAT = 2  # 2: energy + distance thresholds at a fallback budget
_FITTING = ("RouterConfig", "fit", "fit_from_workspace", "fit_and_save", "fallback_thresholds", "confidence_threshold",
            "allowed_above", "short_views", "_fit_softmax", "_temperature")


class Router:
    """A fitted router: the classifier, the task centroids, and the calibrated thresholds."""

    def __init__(self, tasks: list[str], tensors: dict[str, Tensor], meta: dict):
        self.tasks, self.t, self.meta = list(tasks), tensors, meta

    def check(self) -> None:
        """Raise ValueError unless the tensors and settings have the shapes routing relies on."""
        T, D, layers = len(self.tasks), self.t["mean"].numel(), self.layers
        ascending = isinstance(layers, list) and layers and all(type(x) is int and x >= 1 for x in layers) \
            and layers == sorted(set(layers))
        if not ascending or D % len(layers) or layers[-1] != self.meta["layer"]:
            raise ValueError(f"layers {layers!r} are not ascending layer numbers dividing the {D} features")
        want = {"mean": (D,), "std": (D,), "W": (T, D), "b": (T,), "centroids": (T, D // len(layers)), "prior": (T,)}
        for k, shape in want.items():
            if tuple(self.t[k].shape) != shape:
                raise ValueError(f"tensor {k} has shape {tuple(self.t[k].shape)}, expected {shape}")
        th = self.meta["thresholds"]
        numbers = [self.meta["temperature"], th["ood"], th["energy"]]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers) or \
                type(self.meta["layer"]) is not int or not isinstance(self.meta["max_tokens"], int) or \
                not isinstance(self.meta["config"]["batch_size"], int) or self.meta["config"]["batch_size"] < 1:
            raise ValueError("layer, max_tokens, temperature, thresholds or batch_size malformed")

    @property
    def layer(self) -> int:
        """The deepest layer read (where the embedding forward stops)."""
        return self.meta["layer"]

    @property
    def layers(self) -> list[int]:
        """Every layer read, ascending (routers fitted before taps read one)."""
        return self.meta.get("layers", [self.meta["layer"]])

    @property
    def max_tokens(self) -> int:
        return self.meta["max_tokens"]

    @property
    def thresholds(self) -> dict:
        return self.meta["thresholds"]

    def standardise(self, e: Tensor) -> Tensor:
        return (e - self.t["mean"]) / self.t["std"]

    def logits(self, z: Tensor) -> Tensor:
        return z @ self.t["W"].T + self.t["b"]

    def probs(self, e: Tensor) -> Tensor:
        """Calibrated p(task | x), (N, T), from embeddings (N, D)."""
        return torch.softmax(self.logits(self.standardise(e)) / self.meta["temperature"], -1)

    def energy(self, e: Tensor) -> Tensor:
        """-T log sum_t exp(logit_t / T), (N,): high when the classifier has little evidence for any task."""
        return -torch.logsumexp(self.logits(self.standardise(e)) / self.meta["temperature"], -1)

    def ood_scores(self, e: Tensor) -> Tensor:
        """RMS distance of the standardised embeddings after the deepest layer read to the nearest task centroid,
        (N,). The shallower layers are left to the classifier: they carry surface form, and with them the distance
        test sent 81% of BBC headlines (5 words) to Theta instead of 48% (docs/results/router_study.md)."""
        z = self.standardise(e)[:, -self.t["centroids"].shape[1]:]
        return torch.cdist(z, self.t["centroids"]).min(1).values / z.shape[1] ** 0.5

    def log_prior(self) -> Tensor:
        return self.t["prior"].log()

    def bayes_probs(self, mtm: MultiTaskModel, texts: list[str], p: Tensor, candidates: int | None = None) -> Tensor:
        """Posterior p(task | x) ∝ p(x | theta_task) p(task) over each prompt's ``candidates`` most likely
        tasks under the classifier (all by default); the others get 0."""
        k = len(self.tasks) if candidates is None else max(1, min(candidates, len(self.tasks)))
        cand = p.topk(k, dim=1).indices  # (N, k) router-local task indices
        gids = torch.tensor([mtm.task_id(n) for n in self.tasks])[cand]
        ll = log_likelihoods(mtm, texts, gids, self.max_tokens)
        post = torch.softmax(ll + self.log_prior()[cand], -1)
        return torch.zeros_like(p).scatter(1, cand, post)

    def route(self, mtm: MultiTaskModel, texts: list[str], mode: str = "fallback", top_k: int = 2,
              scorer: str = "classifier", candidates: int | None = None) -> list[Route]:
        """Route each text. Empty (or blank) texts carry no evidence: they use Theta in every mode."""
        if scorer not in SCORERS:
            raise RouterError(f"unknown scorer {scorer!r} (scorers: {', '.join(SCORERS)})")
        if mode not in MODES:
            raise RouterError(f"unknown routing mode {mode!r} (modes: {', '.join(MODES)})")
        keep = [i for i, t in enumerate(texts) if t.strip()]
        routes: list[Route] = [Route(GLOBAL_NAME, {GLOBAL_NAME: 1.0}, True, "empty") for _ in texts]
        if keep:
            kept = [texts[i] for i in keep]
            e = embed(mtm, kept, self.layers, self.max_tokens, self.meta["config"]["batch_size"])
            p = self.probs(e)
            if scorer == "bayes" and len(self.tasks) > 1:
                p = self.bayes_probs(mtm, kept, p, candidates)
            for i, r in zip(keep, self.decide(p, self.ood_scores(e), mode, top_k, scorer, self.energy(e))):
                routes[i] = r
        return routes

    def decide(self, p: Tensor, ood: Tensor, mode: str, top_k: int = 2, scorer: str = "classifier",
               energy: Tensor | None = None) -> list[Route]:
        """Routes from probabilities (N, T), distance scores (N,) and, for the classifier, energy scores (N,).
        "unsure" is energy above its threshold (classifier), or max p below the calibrated Bayesian confidence
        (none for an uncalibrated Bayesian scorer: then only distant inputs fall back)."""
        th = self.thresholds
        if scorer == "classifier":
            unsure = [False] * len(p) if energy is None else (energy > th["energy"]).tolist()
        else:
            unsure = [False if th["bayes"] is None else v < th["bayes"] for v in p.max(1).values.tolist()]
        routes = []
        for row, score, low in zip(p.tolist(), ood.tolist(), unsure):
            scores = {n: round(v, 6) for n, v in zip(self.tasks, row)}
            ranked = sorted(range(len(row)), key=lambda i: -row[i])
            top = self.tasks[ranked[0]]
            if mode == "blend":
                keep = [i for i in ranked[: max(1, top_k)] if row[i] > 0] or ranked[:1]
                total = sum(row[i] for i in keep)
                weights = {self.tasks[i]: row[i] / total for i in keep}
                routes.append(Route(top, weights, False, "blend", scores, score))
            elif mode == "fallback" and score > self.thresholds["ood"]:
                routes.append(Route(GLOBAL_NAME, {GLOBAL_NAME: 1.0}, True, "ood", scores, score))
            elif mode == "fallback" and low:
                routes.append(Route(GLOBAL_NAME, {GLOBAL_NAME: 1.0}, True, "unsure", scores, score))
            else:
                routes.append(Route(top, {top: 1.0}, False, "select", scores, score))
        return routes

    # -- persistence -------------------------------------------------------------------------------
    def save(self, store: str | Path) -> None:
        """Write router.safetensors, then router.json naming its SHA-256; each file atomically."""
        store = Path(store)
        with atomic_path(store / ROUTER_WEIGHTS) as tmp:
            save_file({k: v.contiguous() for k, v in self.t.items()}, str(tmp))
            digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        meta = {"format": FORMAT, "tasks": self.tasks, **self.meta, "weights_sha256": digest}
        atomic_write_text(store / ROUTER_JSON, json.dumps(meta, indent=2))

    @classmethod
    def load(cls, store: str | Path, mtm: MultiTaskModel) -> "Router":
        """Load and check against the hub: same base model, every routed task present."""
        store = Path(store)
        jpath, wpath = store / ROUTER_JSON, store / ROUTER_WEIGHTS
        if not jpath.is_file():
            raise RouterError(f"{store}: no router (missing {ROUTER_JSON}); run `borahub router fit` or pass --task")
        try:
            meta = json.loads(jpath.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an integer too long to convert
            raise RouterError(f"{jpath}: not valid JSON ({str(e)[:100]}); run `borahub router fit`") from None
        if not isinstance(meta, dict):
            raise RouterError(f"{jpath}: malformed (not a JSON object); run `borahub router fit`")
        if meta.get("format") != FORMAT:
            raise RouterError(f"{jpath}: unsupported router format {meta.get('format')!r}; run `borahub router fit`")
        if not wpath.is_file() or hashlib.sha256(wpath.read_bytes()).hexdigest() != meta.get("weights_sha256"):
            raise RouterError(f"{wpath}: missing or not the file {ROUTER_JSON} was written with; "
                              "run `borahub router fit`")
        try:
            tensors = load_file(str(wpath))
        except (SafetensorError, OSError, ValueError) as e:
            raise RouterError(f"{wpath}: corrupt safetensors file ({e}); run `borahub router fit`") from None
        fp = meta.get("fingerprint")
        if not isinstance(fp, dict) or base_mismatch(fp, mtm.fingerprint):
            raise RouterError(f"{jpath}: the router was fitted on another base model; run `borahub router fit`")
        tasks = meta.pop("tasks", None)
        if not isinstance(tasks, list) or not tasks or not all(isinstance(n, str) for n in tasks):
            raise RouterError(f"{jpath}: malformed (\"tasks\" is not a list of names); run `borahub router fit`")
        missing = [n for n in tasks if n not in mtm.task_names]
        if missing:
            raise RouterError(f"{jpath}: the router routes to task(s) the hub lacks ({', '.join(missing)}); "
                              "run `borahub router fit`")
        for k in ("format", "weights_sha256"):
            meta.pop(k)
        try:
            router = cls(tasks, tensors, meta)
            router.check()
            cfg = mtm.lm.config
            if router.layer > cfg.num_hidden_layers or \
                    router.t["mean"].numel() != cfg.hidden_size * len(router.layers):
                raise ValueError(f"layers {router.layers} do not fit a model of {cfg.num_hidden_layers} layers "
                                 f"of width {cfg.hidden_size}")
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise RouterError(f"{jpath}: malformed router ({type(e).__name__}: {str(e)[:100]}); "
                              "run `borahub router fit`") from None
        return router


def __getattr__(name: str):
    """The fitting side lives in hub/router_fit.py; ``router.fit`` etc. keep working (imported on first use)."""
    if name in _FITTING:
        from . import router_fit

        return getattr(router_fit, name)
    if name in ("embed", "log_likelihoods", "layer_for", "layers_for", "decoder_layers"):
        from . import embedding

        return getattr(embedding, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
