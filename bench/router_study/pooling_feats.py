"""Exploration (session 17): per-token hidden states at several layers, pooled several ways, for the two hubs of
bench/router.py (HWU64 scenarios, BBC topics) exactly as the product fits them (raw inputs, the registry's splits,
short views). Pooling variants: mean over all tokens (shipped), mean without the first token (which serves as the
attention sink, with hidden states far larger than the others'), and the mean of RMS-normalised tokens without
the first. Saves /tmp/rt2/feats.pt for pooling_analyse.py.

    python bench/router_study/pooling_feats.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.router import DATA, bbc_registry, hwu_registry, read_csv  # noqa: E402
from hub.embedding import decoder_layers  # noqa: E402
from hub.router_fit import short_views  # noqa: E402
from hub.workspace import Workspace  # noqa: E402

LAYERS = (4, 6, 8, 10, 12)
POOLS = ("mean", "skip0", "rms_skip0")


class _Stop(Exception):
    pass


@torch.no_grad()
def embed_all(mtm, texts: list[str], max_tokens: int = 64, batch_size: int = 16) -> dict:
    """{(layer, pool): (N, D)} for every layer in LAYERS and pool in POOLS."""
    tok, lm = mtm.tokenizer, mtm.lm
    layers = decoder_layers(lm)
    out = {(L, p): torch.zeros(len(texts), lm.config.hidden_size) for L in LAYERS for p in POOLS}
    seen: dict[int, torch.Tensor] = {}

    def grab(L):
        def hook(_m, _a, output):
            seen[L] = (output[0] if isinstance(output, tuple) else output).float()
            if L == max(LAYERS):
                raise _Stop()
        return hook

    hooks = [layers[L - 1].register_forward_hook(grab(L)) for L in LAYERS]
    tok.padding_side = "right"
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            enc = tok([texts[i] for i in idx], truncation=True, max_length=max_tokens, padding=True,
                      return_tensors="pt")
            try:
                with mtm.routed(None):
                    lm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
            except _Stop:
                pass
            mask = enc["attention_mask"].unsqueeze(-1).float()
            skip = mask.clone()
            long = mask.sum(1).squeeze(-1) > 1
            skip[long, 0] = 0  # drop the first token when there is another
            for L in LAYERS:
                h = seen[L]
                out[(L, "mean")][idx] = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
                out[(L, "skip0")][idx] = (h * skip).sum(1) / skip.sum(1).clamp(min=1)
                hn = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
                out[(L, "rms_skip0")][idx] = (hn * skip).sum(1) / skip.sum(1).clamp(min=1)
            if start % (batch_size * 50) == 0:
                print(f"  {start}/{len(texts)}", flush=True)
    finally:
        for h in hooks:
            h.remove()
    return out


def hub_split(cfg: Path) -> dict:
    ws = Workspace(cfg)
    names = ws.cfg.task_names
    tr = [(t, e.router_text) for t in names for e in ws.data(t).train[:1000] if e.router_text.strip()]
    va = [(t, e.router_text) for t in names for e in ws.data(t).validation[:1000] if e.router_text.strip()]
    return {"ws": ws, "tasks": names, "train": tr + short_views(tr, 0), "val": va + short_views(va, 1)}


def main() -> None:
    torch.set_num_threads(2)
    bank = [r["text"] for r in read_csv(DATA / "banking77" / "test.csv")]
    bank = bank[:: max(1, len(bank) // 1000)][:1000]
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "hwu64").mkdir()
        (Path(tmp) / "bbc").mkdir()
        hwu_cfg, hwu_test = hwu_registry(Path(tmp) / "hwu64")
        bbc_cfg, bbc_test = bbc_registry(Path(tmp) / "bbc")
        sets = {"hwu64": (hwu_cfg, hwu_test, [("_ood", x) for x in bank]),
                "bbc": (bbc_cfg, bbc_test, [("_ood", x) for _, x in hwu_test])}
        mtm = None
        for name, (cfg, test, ood) in sets.items():
            s = hub_split(cfg)
            mtm = mtm or s["ws"].new_model()
            parts = {"train": s["train"], "val": s["val"], "test": test, "ood": ood,
                     "openings": short_views(test, 2)}
            res[name] = {"tasks": s["tasks"]}
            for part, items in parts.items():
                print(name, part, len(items), flush=True)
                res[name][part] = {"labels": [t for t, _ in items], "feats": embed_all(mtm, [x for _, x in items])}
    Path("/tmp/rt2").mkdir(exist_ok=True)
    torch.save(res, "/tmp/rt2/feats.pt")


if __name__ == "__main__":
    main()
