"""The router: p(task | prompt) from the frozen base model, and when to fall back to the global Theta.

Fit (at the end of `borahub train`, or `borahub router fit`), per task with data:
  1. embed each training input (``Example.router_text``, what a user would send) with the frozen base
     model, adapters off: the mean over its first ``max_tokens`` tokens of the hidden state after decoder
     layer ``depth * n_layers``. The forward stops at that layer, so routing costs a fraction of a
     prefill (BBC News test accuracy 0.94 after layer 8 of SmolLM2's 30, 0.96 after the last, for ~3x
     the fit time: docs/results/router.md);
  2. standardise and fit a multinomial logistic regression (L2, LBFGS): p(task | x);
  3. calibrate on the validation split (never on the data the classifier saw):
     - a temperature for p (validation NLL),
     - the fallback thresholds, to a stated budget of in-distribution inputs sent to Theta
       (``fallback_budget``, default 5% of the validation inputs): a share ``far_share`` of the budget goes
       to the distance test (RMS distance to the nearest task centroid over standardised features: inputs
       unlike every task's inputs, e.g. news articles sent to a hub of short requests), the rest to the
       energy score -T log sum_t exp(logit_t / T) (inputs the classifier has little evidence for, e.g.
       banking questions sent to a hub of assistant domains). Energy, not the top probability: on HWU64
       scenarios with Banking77 as out-of-distribution it caught 50-65% at a 5% budget against 42-59%
       (docs/results/router_study.md), and a confidence threshold set for a target accuracy sent 80% of
       HWU64's in-domain requests to Theta;
     - optionally (``bayes_docs``) a confidence rule (``target_accuracy``) for the Bayesian posterior below.

Modes at inference: ``select`` (top-1), ``blend`` (top-k weighted by p, mixed in output space by the
stacked layer), ``fallback`` (top-1, or Theta when unsure or out of distribution). The Bayesian scorer
replaces p by p(task | x) ∝ p(x | theta_task) p(task), scoring every candidate in one mixed batch.

Limit: the distance test's "unlike every task" means unlike the tasks' training inputs, length included:
tasks fitted on whole documents send short prompts to Theta (BBC headlines: docs/results/router.md).

Files: ``<store>/router.safetensors`` (tensors) and ``<store>/router.json`` (everything else, with the
SHA-256 of the tensors file), each written atomically, tensors first.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.multitask import MultiTaskModel
from models.stacked import GLOBAL
from tasks.atomic import atomic_path, atomic_write_text

ROUTER_JSON, ROUTER_WEIGHTS = "router.json", "router.safetensors"
FORMAT = 2  # 2: energy + distance thresholds at a fallback budget
GLOBAL_NAME = "_global"  # the global Theta in routes; task names start with a letter or digit, so never clash
MODES = ("select", "blend", "fallback")
SCORERS = ("classifier", "bayes")


class RouterError(Exception):
    """No usable router, or a routing request that cannot be served (user-facing)."""


@dataclass
class RouterConfig:
    """Fit settings; the reason beside each default."""

    depth: float = 0.25  # share of decoder layers run: 2 points below the last layer on BBC News, ~3x cheaper
    max_tokens: int = 64  # the router reads a prompt's first 64 tokens (a headline and a sentence or two)
    max_docs: int = 1000  # inputs per task for the fit: HWU64 gains 0.5-2 points from 200 to ~500 (router_study.md)
    l2: float = 1e-3  # ridge on the standardised weights; BBC validation accuracy is flat in 1e-4..3e-3
    fallback_budget: float = 0.05  # share of in-distribution (validation) inputs the fallback mode may send to Theta
    far_share: float = 0.2  # of that budget, for the distance test (1% of inputs); the rest for the energy score
    target_accuracy: float = 0.97  # --bayes only: routing accuracy required above its confidence threshold
    bayes_docs: int = 0  # validation inputs per task to calibrate the Bayesian scorer (each costs T forwards)
    batch_size: int = 16  # prompts per embedding forward


@dataclass
class Route:
    """Where one prompt goes: adapter weights that sum to 1, and why."""

    task: str  # the top task, or GLOBAL_NAME on fallback
    weights: dict[str, float]  # adapter name -> weight, mixed in output space
    fallback: bool = False
    reason: str = "select"  # select | blend | override | unsure | ood | empty
    scores: dict[str, float] = field(default_factory=dict)  # p(task | x) over the routable tasks
    ood: float | None = None  # distance to the nearest task centroid (higher = less like any task)

    def to_json(self) -> dict:
        return {"task": self.task, "weights": self.weights, "fallback": self.fallback, "reason": self.reason,
                "scores": self.scores, "ood_score": self.ood}


class _Stop(Exception):
    def __init__(self, hidden: Tensor):
        self.hidden = hidden


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (the ModuleList as long as ``config.num_hidden_layers``)."""
    n = lm.config.num_hidden_layers
    for m in lm.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise RouterError(f"cannot find the {n} decoder layers of {type(lm).__name__} to embed prompts")


def layer_for(lm: nn.Module, depth: float) -> int:
    n = lm.config.num_hidden_layers
    return min(n, max(1, round(depth * n)))


@torch.no_grad()
def embed(mtm: MultiTaskModel, texts: list[str], layer: int, max_tokens: int, batch_size: int = 16,
          progress=None) -> Tensor:
    """Mean hidden state after decoder layer ``layer`` over each text's first ``max_tokens`` tokens,
    from the frozen base model (adapters off), as float32 (N, hidden). The forward stops at ``layer``."""
    tok, lm = mtm.tokenizer, mtm.lm
    mtm.route(None)
    out = torch.zeros(len(texts), lm.config.hidden_size)

    def stop(_module, _args, output):
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    hook = decoder_layers(lm)[layer - 1].register_forward_hook(stop)
    side, tok.padding_side = tok.padding_side, "right"
    try:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            enc = tok([texts[i] for i in idx], truncation=True, max_length=max_tokens, padding=True,
                      return_tensors="pt").to(mtm.device)
            try:
                lm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
                raise RouterError(f"layer {layer} of {type(lm).__name__} did not run")
            except _Stop as s:
                hidden = s.hidden.float()
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out[idx] = ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu()
            if progress is not None:
                progress.update(len(idx))
    finally:
        hook.remove()
        tok.padding_side = side
    return out


@torch.no_grad()
def log_likelihoods(mtm: MultiTaskModel, texts: list[str], task_ids: Tensor, max_tokens: int,
                    max_rows: int = 32) -> Tensor:
    """log p(x_i | theta_c) for every prompt i and candidate c of ``task_ids`` (N, C): the rows (i, c)
    run as mixed batches (up to ``max_rows`` rows a forward), each row routed to its own task."""
    tok, n, c = mtm.tokenizer, task_ids.shape[0], task_ids.shape[1]
    side, tok.padding_side = tok.padding_side, "right"
    try:
        enc = tok(texts, truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = side
    ids, mask = enc["input_ids"].repeat_interleave(c, 0), enc["attention_mask"].repeat_interleave(c, 0)
    rows = task_ids.reshape(-1)
    out = torch.zeros(n * c)
    for s in range(0, n * c, max_rows):
        sl = slice(s, s + max_rows)
        mtm.route(rows[sl])
        logits = mtm.lm(input_ids=ids[sl].to(mtm.device), attention_mask=mask[sl].to(mtm.device),
                        use_cache=False).logits.float()
        labels = ids[sl, 1:].to(mtm.device).masked_fill(mask[sl, 1:].to(mtm.device) == 0, -100)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
        out[sl] = -nll.sum(1).cpu()
    mtm.route(None)
    return out.view(n, c)


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


def fallback_thresholds(dist: Tensor, energy: Tensor, budget: float, far_share: float) -> tuple[float, float]:
    """(distance threshold, energy threshold) such that at most ``budget`` of these (in-distribution) inputs
    score above either: the distance test takes the ``far_share * budget`` most distant inputs, the energy
    test as many of the highest-energy remaining inputs as the rest of the budget allows."""
    n = len(dist)
    allowed = math.floor(budget * n + 1e-9)
    sorted_d = dist.sort(descending=True).values
    far_t = float(sorted_d[min(n - 1, math.floor(far_share * budget * n + 1e-9))])  # at most that many above it
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


class Router:
    """A fitted router: the classifier, the task centroids, and the calibrated thresholds."""

    def __init__(self, tasks: list[str], tensors: dict[str, Tensor], meta: dict):
        self.tasks, self.t, self.meta = list(tasks), tensors, meta

    def check(self) -> None:
        """Raise ValueError unless the tensors and settings have the shapes routing relies on."""
        T, D = len(self.tasks), self.t["mean"].numel()
        want = {"mean": (D,), "std": (D,), "W": (T, D), "b": (T,), "centroids": (T, D), "prior": (T,)}
        for k, shape in want.items():
            if tuple(self.t[k].shape) != shape:
                raise ValueError(f"tensor {k} has shape {tuple(self.t[k].shape)}, expected {shape}")
        th = self.meta["thresholds"]
        numbers = [self.meta["temperature"], th["ood"], th["energy"]]
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers) or \
                not isinstance(self.meta["layer"], int) or not isinstance(self.meta["max_tokens"], int) or \
                not isinstance(self.meta["config"]["batch_size"], int) or self.meta["config"]["batch_size"] < 1:
            raise ValueError("layer, max_tokens, temperature, thresholds or batch_size malformed")

    @property
    def layer(self) -> int:
        return self.meta["layer"]

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
        """RMS distance of standardised embeddings to the nearest task centroid, (N,)."""
        z = self.standardise(e)
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
            e = embed(mtm, kept, self.layer, self.max_tokens, self.meta["config"]["batch_size"])
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
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RouterError(f"{jpath}: not valid JSON ({e}); run `borahub router fit`") from None
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
        if not isinstance(fp, dict) or {k: fp.get(k) for k in ("config_hash", "weights_hash")} != \
                {k: mtm.fingerprint.get(k) for k in ("config_hash", "weights_hash")}:
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
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise RouterError(f"{jpath}: malformed router ({type(e).__name__}: {str(e)[:100]}); "
                              "run `borahub router fit`") from None
        return router


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
    layer = layer_for(mtm.lm, cfg.depth)
    bar = tqdm(total=len(tr) + len(va), desc="router", unit="doc", disable=not progress)
    e_tr = embed(mtm, [x for _, x in tr], layer, cfg.max_tokens, cfg.batch_size, bar)
    e_va = embed(mtm, [x for _, x in va], layer, cfg.max_tokens, cfg.batch_size, bar)
    bar.close()
    y_tr = torch.tensor([tasks.index(t) for t, _ in tr])
    y_va = torch.tensor([tasks.index(t) for t, _ in va])

    mean, std = e_tr.mean(0), e_tr.std(0, unbiased=False).clamp(min=1e-6)
    z_tr = (e_tr - mean) / std
    T = len(tasks)
    W, b = _fit_softmax(z_tr, y_tr, T, cfg.l2)
    counts = torch.bincount(y_tr, minlength=T).float()
    centroids = torch.stack([z_tr[y_tr == i].mean(0) for i in range(T)])
    tensors = {"mean": mean, "std": std, "W": W, "b": b, "centroids": centroids, "prior": counts / counts.sum()}
    router = Router(tasks, tensors, {"layer": layer, "max_tokens": cfg.max_tokens, "temperature": 1.0,
                                     "fingerprint": mtm.fingerprint, "config": asdict(cfg)})

    router.meta["temperature"] = _temperature(router.logits(router.standardise(e_va)), y_va)
    p = router.probs(e_va)
    correct = p.argmax(1) == y_va
    ood, energy = router.ood_scores(e_va), router.energy(e_va)
    ood_t, energy_t = fallback_thresholds(ood, energy, cfg.fallback_budget, cfg.far_share)
    router.meta["thresholds"] = {"ood": ood_t, "energy": energy_t, "bayes": None}
    far = ood > ood_t
    unsure = (energy > energy_t) & ~far
    kept = ~(far | unsure)
    router.meta["calibration"] = {
        "split": split, "inputs": len(va), "accuracy": float(correct.float().mean()),
        "budget": cfg.fallback_budget, "false_fallback": float((~kept).float().mean()),
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


def global_id(name: str, mtm: MultiTaskModel) -> int:
    """Routing id of an adapter name (a task, or GLOBAL_NAME for Theta)."""
    if name == GLOBAL_NAME:
        return GLOBAL
    if name not in mtm.task_names:
        raise RouterError(f"unknown task {name!r} (tasks: {', '.join(mtm.task_names)})")
    return mtm.task_id(name)
