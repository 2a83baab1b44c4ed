"""A small MLP head against the linear one, on the saved layer-8 mean features (feats.py / feats2.py)."""
import json
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, "/work/main")
from hub.router import _fit_softmax  # noqa: E402

torch.manual_seed(0)


def mlp(z, y, T, hidden=256, wd=1e-2, epochs=300):
    net = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(z.shape[1], hidden), torch.nn.GELU(),
                              torch.nn.Linear(hidden, T))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=wd)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(net(z), y).backward()
        opt.step()
    return net.eval()


def compare(tr_e, tr_y, te_e, te_y, T, cap):
    idx = torch.cat([(tr_y == t).nonzero().flatten()[:cap] for t in range(T)])
    e, y = tr_e[idx], tr_y[idx]
    mean, std = e.mean(0), e.std(0, unbiased=False).clamp(min=1e-6)
    z, zt = (e - mean) / std, (te_e - mean) / std
    W, b = _fit_softmax(z, y, T, 1e-3)
    lin = float(((zt @ W.T + b).argmax(1) == te_y).float().mean())
    out = {"linear": round(lin, 4)}
    for h in (128, 512):
        net = mlp(z, y, T, hidden=h)
        with torch.no_grad():
            out[f"mlp{h}"] = round(float((net(zt).argmax(1) == te_y).float().mean()), 4)
    return out


H, Fe = torch.load("/tmp/rt/feats2.pt"), torch.load("/tmp/rt/feats.pt")
b, k = Fe["bbc"], (8, "mean")
res = {f"hwu64_cap{c}": compare(H["train"]["e"][8], H["train"]["y"], H["test"]["e"][8], H["test"]["y"], 18, c)
       for c in (200, 1000)}
res["bbc_cap200"] = compare(b["train"]["e"][k], b["train"]["y"], b["test"]["e"][k], b["test"]["y"], 5, 200)
print(json.dumps(res, indent=1))
