import sys
import time
import torch
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/tmp/rt")
from models.base import load_base
from tasks.data import bbc_news_folder, split
from tasks.schema import DataSpec
from hub.router import _fit_softmax
torch.set_num_threads(2)
lm, tok = load_base("smollm2-135m"); tok.padding_side = "right"; lm.model.layers = lm.model.layers[:8]
topics = ["business", "entertainment", "politics", "sports", "tech"]
S = {"train": [], "val": [], "test": []}
for t in topics:
    texts = [p.read_bytes().decode("utf-8", "replace").strip() for p in sorted((bbc_news_folder() / t).glob("*.txt"))]
    a, b, c = split(len(texts), DataSpec(bbc_news=t), t, 0)
    S["train"] += [(t, texts[i]) for i in a[:200]]; S["val"] += [(t, texts[i]) for i in b]; S["test"] += [(t, texts[i]) for i in c]
def embed(texts, mt, bs=8):
    out = {d: torch.zeros(len(texts), 576) for d in (4, 6, 8)}
    for s in range(0, len(texts), bs):
        enc = tok(texts[s:s+bs], truncation=True, max_length=mt, padding=True, return_tensors="pt")
        with torch.no_grad(): hs = lm.model(**enc, output_hidden_states=True).hidden_states
        m = enc["attention_mask"].unsqueeze(-1).float()
        for d in out: out[d][s:s+bs] = (hs[d] * m).sum(1) / m.sum(1)
    return out
for mt in (64, 128, 256):
    t0 = time.time()
    E = {sp: embed([x for _, x in rows], mt) for sp, rows in S.items()}
    Y = {sp: torch.tensor([topics.index(l) for l, _ in rows]) for sp, rows in S.items()}
    for key in (4, 6, 8, "4+8"):
        g = (lambda sp: torch.cat([E[sp][4], E[sp][8]], 1)) if key == "4+8" else (lambda sp, k=key: E[sp][k])
        e = g("train"); mean, std = e.mean(0), e.std(0).clamp(min=1e-6); z = lambda x: (x - mean) / std
        for l2 in (1e-3, 1e-2):
            W, b = _fit_softmax(z(e), Y["train"], 5, l2)
            acc = float(((z(g("test")) @ W.T + b).argmax(1) == Y["test"]).float().mean())
            vacc = float(((z(g("val")) @ W.T + b).argmax(1) == Y["val"]).float().mean())
            print(mt, key, l2, "test", round(acc, 4), "val", round(vacc, 4), f"{time.time()-t0:.0f}s", flush=True)
