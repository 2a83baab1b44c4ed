"""Exploration (session 17): short inputs to a hub of documents after the switch to layers 4+6+8. On the BBC hub of
bench/router.py, with the product's fit and calibration: which layers the distance test reads (all three, or
the deepest only) and how short the short views go (8-24 words as shipped, or 4-24), judged on select accuracy,
false fallback, OOD recall (HWU64 requests), openings (8-24 words of test articles) and headlines (the first line
of each test article, ~5 words: what a user sends).

    python bench/router_study/length_study.py
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.router import bbc_registry, hwu_registry  # noqa: E402
from hub.embedding import embed  # noqa: E402
from hub.router_fit import RouterConfig, _fit_softmax, _temperature, fallback_thresholds, short_views  # noqa: E402
from hub.workspace import Workspace  # noqa: E402

LAYERS = [4, 6, 8]


def main() -> None:
    torch.set_num_threads(2)
    cfg = RouterConfig()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "bbc").mkdir()
        (Path(tmp) / "hwu").mkdir()
        bbc_cfg, test = bbc_registry(Path(tmp) / "bbc")
        _, hwu_test = hwu_registry(Path(tmp) / "hwu")
        ws = Workspace(bbc_cfg)
        tasks = ws.cfg.task_names
        tr = [(t, e.router_text) for t in tasks for e in ws.data(t).train]
        va = [(t, e.router_text) for t in tasks for e in ws.data(t).validation]
        mtm = ws.new_model()

    def emb(items):
        return embed(mtm, [x for _, x in items], LAYERS, cfg.max_tokens), torch.tensor([tasks.index(t) for t, _ in items])

    heads = [(t, x.split("\n")[0]) for t, x in test]
    base = {k: emb(v) for k, v in {"tr": tr, "va": va, "test": test, "heads": heads,
                                  "openings": short_views(test, 2)}.items()}
    ood = embed(mtm, [x for _, x in hwu_test], LAYERS, cfg.max_tokens)
    d = mtm.lm.config.hidden_size
    for shortest in (8, 4):
        vtr, vva = emb(short_views(tr, 0, shortest)), emb(short_views(va, 1, shortest))
        e_tr, y_tr = torch.cat([base["tr"][0], vtr[0]]), torch.cat([base["tr"][1], vtr[1]])
        e_va, y_va = torch.cat([base["va"][0], vva[0]]), torch.cat([base["va"][1], vva[1]])
        for name, cols, dist_cols in (("layer 8", slice(2 * d, 3 * d), None),
                                      ("4+6+8", slice(0, 3 * d), None),
                                      ("4+6+8, distance on 8", slice(0, 3 * d), slice(2 * d, 3 * d))):
            f = e_tr[:, cols]
            mean, std = f.mean(0), f.std(0, unbiased=False).clamp(min=1e-6)
            z = (f - mean) / std
            W, b = _fit_softmax(z, y_tr, len(tasks), cfg.l2)
            dc = slice(0, z.shape[1]) if dist_cols is None else slice(dist_cols.start - cols.start,
                                                                     dist_cols.stop - cols.start)
            cent = torch.stack([z[y_tr == i, dc].mean(0) for i in range(len(tasks))])

            def score(e, temp=1.0):
                zz = (e[:, cols] - mean) / std
                logits = zz @ W.T + b
                dist = torch.cdist(zz[:, dc], cent).min(1).values / (dc.stop - dc.start) ** 0.5
                return logits, dist, -torch.logsumexp(logits / temp, -1)

            logits_va, _, _ = score(e_va)
            temp = _temperature(logits_va, y_va)
            _, dist_va, en_va = score(e_va, temp)
            t_d, t_e = fallback_thresholds(dist_va, en_va, cfg.fallback_budget, cfg.far_share, cfg.budget_confidence)

            def rates(e, y=None):
                logits, dist, en = score(e, temp)
                fell = (dist > t_d) | (en > t_e)
                out = {"to_theta": round(float(fell.float().mean()), 4),
                       "by_distance": round(float((dist > t_d).float().mean()), 4)}
                if y is not None:
                    out["select_acc"] = round(float((logits.argmax(1) == y).float().mean()), 4)
                return out

            row = {"short_views": f"{shortest}-24 words", "layers": name,
                   **{k: rates(*base[k]) for k in ("test", "openings", "heads")}, "ood_hwu64": rates(ood)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
