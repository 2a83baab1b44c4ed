"""Prompt embeddings for routing (the frozen base model, stopped after a layer) and per-task log-likelihoods
for the Bayesian scorer."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.multitask import MultiTaskModel

from .route import RouterError


class _Stop(Exception):
    """Raised by the deepest hook: the rest of the forward is not needed."""


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


def layers_for(lm: nn.Module, depth: float, taps: Sequence[float]) -> list[int]:
    """The decoder layers whose states a router reads: ``taps`` (shares of the routing depth, e.g. 0.5, 0.75, 1)
    of the layer at ``depth``, rounded, at least 1, without repeats, ascending (4, 6, 8 for SmolLM2's 30)."""
    deepest = layer_for(lm, depth)
    return sorted({min(deepest, max(1, round(t * deepest))) for t in taps})


@torch.no_grad()
def embed(mtm: MultiTaskModel, texts: list[str], layers: int | Sequence[int], max_tokens: int, batch_size: int = 16,
          progress=None) -> Tensor:
    """Each text's mean hidden state over its first ``max_tokens`` tokens after each decoder layer of ``layers``,
    concatenated in that order, from the frozen base model (adapters off), as float32 (N, hidden * len(layers)).
    The forward stops after the deepest of them, so the shallower ones cost only their pooling."""
    tok, lm = mtm.tokenizer, mtm.lm
    layers = [layers] if isinstance(layers, int) else list(layers)
    n = lm.config.num_hidden_layers
    if not layers or not all(type(x) is int and 1 <= x <= n for x in layers):
        raise RouterError(f"cannot embed after layers {layers!r}: {type(lm).__name__} has layers 1 to {n}")
    deepest, d = max(layers), lm.config.hidden_size
    out = torch.zeros(len(texts), d * len(layers))
    seen: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(_module, _args, output):
            seen[layer] = output[0] if isinstance(output, tuple) else output
            if layer == deepest:
                raise _Stop()
        return hook

    blocks, hooks = decoder_layers(lm), []
    side, tok.padding_side = tok.padding_side, "right"
    try:
        hooks += [blocks[layer - 1].register_forward_hook(keep(layer)) for layer in set(layers)]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths pad less
        for start in range(0, len(order), batch_size):
            idx = order[start: start + batch_size]
            enc = tok([texts[i] for i in idx], truncation=True, max_length=max_tokens, padding=True,
                      return_tensors="pt").to(mtm.device)
            seen.clear()
            try:
                with mtm.routed(None):  # adapters off, even inside another routed forward
                    lm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
                raise RouterError(f"layer {deepest} of {type(lm).__name__} did not run")
            except _Stop:
                pass
            mask = enc["attention_mask"].unsqueeze(-1).float()
            count = mask.sum(1).clamp(min=1)
            for j, layer in enumerate(layers):
                out[idx, j * d:(j + 1) * d] = ((seen[layer].float() * mask).sum(1) / count).cpu()
            if progress is not None:
                progress.update(len(idx))
    finally:
        for h in hooks:
            h.remove()
        tok.padding_side = side
        seen.clear()
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
        with mtm.routed(rows[sl]):
            logits = mtm.lm(input_ids=ids[sl].to(mtm.device), attention_mask=mask[sl].to(mtm.device),
                            use_cache=False).logits.float()
        labels = ids[sl, 1:].to(mtm.device).masked_fill(mask[sl, 1:].to(mtm.device) == 0, -100)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
        out[sl] = -nll.sum(1).cpu()
    return out.view(n, c)
