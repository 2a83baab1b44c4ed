import sys
import torch
import torch.nn.functional as F
sys.path.insert(0, "/work/main")
from hub.router import _fit_softmax, _temperature
D = torch.load("/tmp/rt/feats.pt")
B = 0.05

def maha_fit(z, y, T, shrink=0.1):
    mu = torch.stack([z[y == t].mean(0) for t in range(T)])
    r = z - mu[y]
    cov = r.T @ r / len(z)
    cov = (1 - shrink) * cov + shrink * torch.eye(cov.shape[0]) * cov.diagonal().mean()
    return mu, torch.linalg.inv(cov)

def maha(z, mu, P):
    d = z[:, None, :] - mu[None]
    return torch.einsum("ntd,de,nte->nt", d, P, d).min(1).values

def knn(zn, bank, k=5):
    s = zn @ bank.T
    return -s.topk(k, 1).values.mean(1)

def run(name, ood, key):
    d = D[name]; T = len(d["labels"])
    e_tr, y_tr = d["train"]["e"][key], d["train"]["y"]
    mean, std = e_tr.mean(0), e_tr.std(0).clamp(min=1e-6)
    z = lambda e: (e - mean) / std
    W, b = _fit_softmax(z(e_tr), y_tr, T, 1e-3)
    lg = lambda e: z(e) @ W.T + b
    temp = _temperature(lg(d["val"]["e"][key]), d["val"]["y"])
    p = lambda e: torch.softmax(lg(e) / temp, -1)
    mu, P = maha_fit(z(e_tr), y_tr, T)
    bank = F.normalize(z(e_tr), dim=1)
    res = {}
    pte = p(d["test"]["e"][key]); acc = float((pte.argmax(1) == d["test"]["y"]).float().mean())
    res["acc"] = round(acc, 4)
    scores = {
        "msp": lambda e: -p(e).max(1).values,
        "maha": lambda e: maha(z(e), mu, P),
        "knn": lambda e: knn(F.normalize(z(e), dim=1), bank),
        "centroid": lambda e: torch.cdist(z(e), torch.stack([z(e_tr)[y_tr == t].mean(0) for t in range(T)])).min(1).values,
    }
    for sname, f in scores.items():
        sv, st, so = f(d["val"]["e"][key]), f(d["test"]["e"][key]), f(D[ood]["e"][key])
        t = float(torch.quantile(sv, 1 - B))
        ff = float((st > t).float().mean()); rec = float((so > t).float().mean())
        kept = st <= t
        res[sname] = (round(ff, 3), round(rec, 3), round(float((pte.argmax(1)[kept] == d["test"]["y"][kept]).float().mean()), 4))
    return res

for name, ood in (("hwu", "banking_ood"), ("bbc", "hwu_ood")):
    for key in sorted(D[name]["train"]["e"]):
        print(name, key, run(name, ood, key), flush=True)
