"""Exploration: embed dev data at several depths with mean / last pooling; save tensors."""
import csv
import sys
import time
import random
import torch
sys.path.insert(0, "/work/main")
from models.base import load_base
from tasks.data import bbc_news_folder, split
from tasks.schema import DataSpec
torch.set_num_threads(2)
lm, tok = load_base("smollm2-135m")
tok.padding_side = "right"
DEPTHS = [4, 8, 12, 16, 23, 30]
layers = lm.model.layers

def embed(texts, max_tokens=64, bs=16):
    out = {(d, p): torch.zeros(len(texts), lm.config.hidden_size) for d in DEPTHS for p in ("mean", "last")}
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for s in range(0, len(order), bs):
        idx = order[s:s+bs]
        enc = tok([texts[i] for i in idx], truncation=True, max_length=max_tokens, padding=True, return_tensors="pt")
        with torch.no_grad():
            hs = lm.model(**enc, output_hidden_states=True).hidden_states
        m = enc["attention_mask"].unsqueeze(-1).float()
        last = enc["attention_mask"].sum(1) - 1
        for d in DEPTHS:
            h = hs[d].float()
            out[(d, "mean")][idx] = (h * m).sum(1) / m.sum(1)
            out[(d, "last")][idx] = h[torch.arange(len(idx)), last]
    return out

def hwu():
    rows = {}
    for split_ in ("train", "test"):
        with open(f"/work/shared/data/hwu64/{split_}.csv") as f:
            rows[split_] = [(r["scenario"], r["text"]) for r in csv.DictReader(f)]
    scen = sorted({s for s, _ in rows["train"]})
    rng = random.Random(0)
    tr, va = [], []
    for s in scen:
        xs = [t for sc, t in rows["train"] if sc == s]
        rng.shuffle(xs)
        nv = max(1, round(0.1 * len(xs)))
        va += [(s, t) for t in xs[:nv]]; tr += [(s, t) for t in xs[nv:nv + 200]]
    return scen, tr, va, rows["test"]

def bbc():
    topics = ["business", "entertainment", "politics", "sports", "tech"]
    tr, va, te = [], [], []
    for t in topics:
        files = sorted((bbc_news_folder() / t).glob("*.txt"))
        texts = [p.read_bytes().decode("utf-8", "replace").strip() for p in files]
        a, b, c = split(len(texts), DataSpec(bbc_news=t), t, 0)
        tr += [(t, texts[i]) for i in a[:200]]; va += [(t, texts[i]) for i in b]; te += [(t, texts[i]) for i in c]
    return topics, tr, va, te

def banking(n=1000):
    with open("/work/shared/data/banking77/test.csv") as f:
        xs = [r["text"] for r in csv.DictReader(f)]
    random.Random(1).shuffle(xs)
    return xs[:n]

data = {}
for name, fn in (("hwu", hwu), ("bbc", bbc)):
    labels, tr, va, te = fn()
    data[name] = {"labels": labels}
    for sp, rows in (("train", tr), ("val", va), ("test", te)):
        t0 = time.time()
        data[name][sp] = {"y": torch.tensor([labels.index(l) for l, _ in rows]), "e": embed([x for _, x in rows]),
                          "len": torch.tensor([len(tok(x)["input_ids"]) for _, x in rows])}
        print(name, sp, len(rows), f"{time.time()-t0:.1f}s", flush=True)
for name, xs in (("banking_ood", banking()), ("hwu_ood", [t for _, t in hwu()[3]])):
    data[name] = {"e": embed(xs), "len": torch.tensor([len(tok(x)["input_ids"]) for x in xs])}
    print(name, len(xs), flush=True)
torch.save(data, "/tmp/rt/feats.pt")
