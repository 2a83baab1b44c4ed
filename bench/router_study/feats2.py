import csv
import sys
import time
import random
import torch
sys.path.insert(0, "/work/main")
from models.base import load_base
torch.set_num_threads(2)
lm, tok = load_base("smollm2-135m"); tok.padding_side = "right"
lm.model.layers = lm.model.layers[:8]
DEPTHS = [6, 8]
def embed(texts, bs=32):
    out = {d: torch.zeros(len(texts), lm.config.hidden_size) for d in DEPTHS}
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for s in range(0, len(order), bs):
        idx = order[s:s+bs]
        enc = tok([texts[i] for i in idx], truncation=True, max_length=64, padding=True, return_tensors="pt")
        with torch.no_grad():
            hs = lm.model(**enc, output_hidden_states=True).hidden_states
        m = enc["attention_mask"].unsqueeze(-1).float()
        for d in DEPTHS:
            out[d][idx] = (hs[d].float() * m).sum(1) / m.sum(1)
    return out
rows = {}
for sp in ("train", "test"):
    with open(f"/work/shared/data/hwu64/{sp}.csv") as f:
        rows[sp] = [(r["scenario"], r["text"]) for r in csv.DictReader(f)]
scen = sorted({s for s, _ in rows["train"]})
rng = random.Random(0); tr, va = [], []
for s in scen:
    xs = [t for sc, t in rows["train"] if sc == s]; rng.shuffle(xs)
    nv = max(1, round(0.1 * len(xs))); va += [(s, t) for t in xs[:nv]]; tr += [(s, t) for t in xs[nv:]]
t0 = time.time()
D = {"labels": scen}
for sp, rr in (("train", tr), ("val", va), ("test", rows["test"])):
    D[sp] = {"y": torch.tensor([scen.index(l) for l, _ in rr]), "e": embed([x for _, x in rr])}
    print(sp, len(rr), time.time() - t0, flush=True)
with open("/work/shared/data/banking77/test.csv") as f:
    xs = [r["text"] for r in csv.DictReader(f)]
random.Random(1).shuffle(xs)
D["ood"] = {"e": embed(xs[:1000])}
torch.save(D, "/tmp/rt/feats2.pt")
