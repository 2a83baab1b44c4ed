import sys
import torch
sys.path.insert(0, "/work/main")
from hub.router import _fit_softmax, _temperature
D = torch.load("/tmp/rt/feats2.pt"); T = len(D["labels"]); B = 0.05
def gauss(z, y):
    mu = torch.stack([z[y == t].mean(0) for t in range(T)]); r = z - mu[y]
    cov = r.T @ r / len(z); cov = 0.9 * cov + 0.1 * torch.eye(len(cov)) * cov.diagonal().mean()
    mu0 = z.mean(0); r0 = z - mu0; c0 = r0.T @ r0 / len(z); c0 = 0.9 * c0 + 0.1 * torch.eye(len(c0)) * c0.diagonal().mean()
    return mu, torch.linalg.inv(cov), mu0, torch.linalg.inv(c0)
def md(z, mu, P):
    d = z[:, None] - mu[None]; return torch.einsum("ntd,de,nte->nt", d, P, d)
for layer in (6, 8):
  for cap in (200, 400, 10000):
    for l2 in (1e-3, 1e-2):
        idx = torch.cat([(D["train"]["y"] == t).nonzero().flatten()[:cap] for t in range(T)])
        e, y = D["train"]["e"][layer][idx], D["train"]["y"][idx]
        mean, std = e.mean(0), e.std(0).clamp(min=1e-6); z = lambda x: (x - mean) / std
        W, b = _fit_softmax(z(e), y, T, l2)
        lg = lambda x: z(x) @ W.T + b
        temp = _temperature(lg(D["val"]["e"][layer]), D["val"]["y"])
        p = lambda x: torch.softmax(lg(x) / temp, -1)
        acc = float((p(D["test"]["e"][layer]).argmax(1) == D["test"]["y"]).float().mean())
        mu, P, mu0, P0 = gauss(z(e), y)
        S = {"msp": lambda x: -p(x).max(1).values,
             "energy": lambda x: -torch.logsumexp(lg(x), 1),
             "maha": lambda x: md(z(x), mu, P).min(1).values,
             "rmd": lambda x: (md(z(x), mu, P) - md(z(x), mu0[None], P0)).min(1).values}
        out = {}
        vals = {k: (f(D["val"]["e"][layer]), f(D["test"]["e"][layer]), f(D["ood"]["e"][layer])) for k, f in S.items()}
        for k, (sv, st, so) in vals.items():
            t = torch.quantile(sv, 1 - B); out[k] = (round(float((st > t).float().mean()), 3), round(float((so > t).float().mean()), 3))
        # min-p combination of maha and msp / rmd and msp
        def cdf(sv, s): return torch.searchsorted(sv.sort().values, s.contiguous()).float() / len(sv)
        for a, bb in (("maha", "msp"), ("rmd", "msp"), ("maha", "energy")):
            comb = [torch.maximum(cdf(vals[a][0], vals[a][i]), cdf(vals[bb][0], vals[bb][i])) for i in range(3)]
            t = torch.quantile(comb[0], 1 - B); out[a + "+" + bb] = (round(float((comb[1] > t).float().mean()), 3), round(float((comb[2] > t).float().mean()), 3))
        print(layer, cap, l2, round(acc, 4), out, flush=True)
