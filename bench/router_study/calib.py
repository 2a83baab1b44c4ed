"""The shipped calibration (hub/router.py: fallback_thresholds, energy + centroid distance) on the features of
feats.py / feats2.py: HWU64 scenarios (Banking77 as out-of-distribution) and BBC topics (HWU64 as OOD), at the
default depth (layer 8 of 30, mean pooling) and max_docs (200 training inputs per task). Prints JSON."""
import json
import sys

import torch

sys.path.insert(0, "/work/main")
from hub.router import RouterConfig, _fit_softmax, _temperature, fallback_thresholds  # noqa: E402


def run(tr_e, tr_y, va_e, va_y, te_e, te_y, ood_e, T, cap=200):
    idx = torch.cat([(tr_y == t).nonzero().flatten()[:cap] for t in range(T)])
    e, y = tr_e[idx], tr_y[idx]
    mean, std = e.mean(0), e.std(0, unbiased=False).clamp(min=1e-6)
    z = lambda x: (x - mean) / std  # noqa: E731
    W, b = _fit_softmax(z(e), y, T, RouterConfig.l2)
    lg = lambda x: z(x) @ W.T + b  # noqa: E731
    temp = _temperature(lg(va_e), va_y)
    cent = torch.stack([z(e)[y == t].mean(0) for t in range(T)])
    dist = lambda x: torch.cdist(z(x), cent).min(1).values / x.shape[1] ** 0.5  # noqa: E731
    energy = lambda x: -torch.logsumexp(lg(x) / temp, -1)  # noqa: E731
    cfg = RouterConfig()
    td, te_ = fallback_thresholds(dist(va_e), energy(va_e), cfg.fallback_budget, cfg.far_share)

    def rates(x):
        far, uns = dist(x) > td, energy(x) > te_
        return far, uns & ~far
    out = {}
    far, uns = rates(te_e)
    pred = lg(te_e).argmax(1)
    kept = ~(far | uns)
    out["select_accuracy"] = round(float((pred == te_y).float().mean()), 4)
    out["test_false_fallback"] = round(float((~kept).float().mean()), 4)
    out["test_far"], out["test_unsure"] = round(float(far.float().mean()), 4), round(float(uns.float().mean()), 4)
    out["accuracy_on_the_rest"] = round(float((pred[kept] == te_y[kept]).float().mean()), 4)
    vf, vu = rates(va_e)
    out["validation_false_fallback"] = round(float((vf | vu).float().mean()), 4)
    of, ou = rates(ood_e)
    out["ood_recall"] = round(float((of | ou).float().mean()), 4)
    out["ood_far"], out["ood_unsure"] = round(float(of.float().mean()), 4), round(float(ou.float().mean()), 4)
    return out


H = torch.load("/tmp/rt/feats2.pt")
F = torch.load("/tmp/rt/feats.pt")
res = {"config": {"fallback_budget": RouterConfig.fallback_budget, "far_share": RouterConfig.far_share,
                  "layer": 8, "pooling": "mean", "max_docs": 200}}
res["hwu64_scenarios"] = run(H["train"]["e"][8], H["train"]["y"], H["val"]["e"][8], H["val"]["y"], H["test"]["e"][8],
                             H["test"]["y"], H["ood"]["e"][8], len(H["labels"]))
b, k = F["bbc"], (8, "mean")
res["bbc_topics"] = run(b["train"]["e"][k], b["train"]["y"], b["val"]["e"][k], b["val"]["y"], b["test"]["e"][k],
                        b["test"]["y"], F["hwu_ood"]["e"][k], len(b["labels"]))
print(json.dumps(res, indent=1))
