"""Continuous mixed-adapter decoding: rows join and leave a running batch at step boundaries.

A ``DecodeBatch`` holds the rows being generated, their KV cache (left-padded to one length, appended in place:
hub/kv_cache.py) and their attention mask. ``add`` prefills new rows as left-padded batches of similar lengths
(``length_groups``) under their own routing and joins their cache to the running one (the shorter side padded on the
left, masked); ``step`` runs one forward for every row (one token each, each row with its own adapter or blend: a
``Routing`` passed with the forward, reused while the rows are unchanged so the per-row parameters are gathered
once); finished rows leave with ``drop``, and columns no remaining row attends to are cut. Greedy or sampled per row
(temperature, top-p, a generator per row, so a seeded row samples the same tokens alone or in any batch), stop
strings, EOS and token limits per row. The engine (a list of prompts) and the server (requests arriving over time)
both decode with it, so they generate the same text for the same prompt and adapter.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from models.multitask import MultiTaskModel
from models.routing import GLOBAL, Routing

from .kv_cache import roomy


@dataclass
class Sampling:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(eq=False)  # rows compare by identity
class Row:
    """One sequence being generated: its prompt ids, adapters ((K,) ids and weights) and sampling."""

    ids: list[int]
    adapter_ids: Tensor  # (K,) global task ids
    adapter_weights: Tensor  # (K,)
    sampling: Sampling
    on_text: Callable[["Row", str], None] | None = None  # called with each new piece of safe-to-show text
    out: list[int] = field(default_factory=list)
    text: str = ""
    shown: int = 0  # characters of text already passed to on_text
    finish: str | None = None  # "stop" (EOS or a stop string) | "length"
    generator: torch.Generator | None = None

    def __post_init__(self):
        if self.sampling.do_sample:
            self.generator = torch.Generator()
            self.generator.manual_seed(self.sampling.seed if self.sampling.seed is not None
                                       else int(torch.randint(0, 2**62, (1,))))


class DecodeBatch:
    """The running batch of one model. Not thread-safe: one thread drives it."""

    # what one more prefill forward costs, in prompt tokens: on the CPU, rows of very different lengths prefill in
    # separate forwards (``length_groups``) when that saves more padded tokens than this per extra forward
    prefill_overhead = 64

    def __init__(self, mtm: MultiTaskModel, prefixes: "PrefixCache | None" = None):
        self.mtm, self.tok, self.lm, self.prefixes = mtm, mtm.tokenizer, mtm.lm, prefixes
        self.rows: list[Row] = []
        self.cache = None
        self.mask: Tensor | None = None  # (N, L) over the cached columns
        self.last: Tensor | None = None  # (N,) the token each row feeds next
        self._routing: Routing | None = None
        gc = self.lm.generation_config
        eos = gc.eos_token_id if gc.eos_token_id is not None else self.tok.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(self.eos), 0)

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()  # no autograd bookkeeping at all: a 16-row step measured 3-5 ms (3-5%) faster than no_grad
    def add(self, rows: list[Row]) -> None:
        """Prefill ``rows``, take each row's first token, and join them to the running batch. Rows that start
        with the shared prefix (the chat template's system turn) and use one adapter prefill only the rest, on
        top of that adapter's cached prefix."""
        if not rows:
            return
        shared = [r for r in rows if self.prefixes is not None and self.prefixes.fits(r)]
        for part, past in ((shared, self.prefixes), ([r for r in rows if r not in shared], None)):
            if not part:
                continue
            n_pre = 0 if past is None else len(past.ids)
            # on a GPU a prefill this small is bound by its kernel launches, not its tokens: one forward there
            cpu = self.mtm.device.type == "cpu"
            for group in length_groups(part, lambda r: len(r.ids) - n_pre, self.prefill_overhead) if cpu else [part]:
                self._prefill(group, past)

    def _prefill(self, rows: list[Row], prefixes: "PrefixCache | None") -> None:
        dev, n_pre = self.mtm.device, 0 if prefixes is None else len(prefixes.ids)
        width = max(len(r.ids) for r in rows) - n_pre
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.ones((len(rows), n_pre + width), dtype=torch.long)
        for i, r in enumerate(rows):
            rest = r.ids[n_pre:]
            ids[i, width - len(rest):] = torch.tensor(rest)
            mask[i, n_pre: n_pre + width - len(rest)] = 0  # left padding, after the prefix
        past = None if prefixes is None else prefixes.stacked(rows)
        # the last position's logits only, asked for by index (not logits_to_keep=1): the index gathers the rows'
        # last hidden states into a contiguous (N, 1, d) tensor, where the slice leaves a strided view that a bf16
        # matmul on the CPU multiplies by copying the output layer once per row (16 rows: 2.3 s of a 3.9 s prefill)
        with self.mtm.routed(rows_routing(rows)):
            out = self.lm(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                          position_ids=_positions(mask)[:, n_pre:].to(dev), cache=past, use_cache=True,
                          logits_to_keep=torch.tensor([width - 1], device=dev))
        mask, first = mask.to(dev), self._pick(out.logits[:, -1], rows)
        if self.rows:
            self.cache, self.mask = _join(self.cache, self.mask, out.cache, mask)
            self.last = torch.cat([self.last, first])
        else:
            self.cache, self.mask, self.last = roomy(out.cache), mask, first
        self.rows += rows
        self._routing = None
        for r, t in zip(rows, first.tolist()):
            self._append(r, t)

    @torch.inference_mode()
    def step(self) -> None:
        """One token for every unfinished row."""
        if not self.rows:
            return
        dev = self.mtm.device
        self.mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=self.mask.dtype, device=dev)], 1)
        if self._routing is None:
            self._routing = rows_routing(self.rows)  # kept across steps: gathered parameters are reused
        with self.mtm.routed(self._routing):
            out = self.lm(input_ids=self.last[:, None].to(dev), attention_mask=self.mask,
                          position_ids=_positions(self.mask)[:, -1:], cache=self.cache, use_cache=True)
        self.cache = out.cache
        self.last = self._pick(out.logits[:, -1], self.rows)
        for r, t in zip(self.rows, self.last.tolist()):
            if r.finish is None:
                self._append(r, t)

    def finished(self) -> list[Row]:
        return [r for r in self.rows if r.finish is not None]

    @torch.inference_mode()
    def drop(self, rows: list[Row]) -> None:
        """Remove rows (finished, or dropped by the caller) and the cache columns no remaining row needs."""
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        self._routing = None
        if not keep:
            self.cache = self.mask = self.last = None
            return
        idx = torch.tensor(keep, device=self.mask.device)
        start = int(self.mask[idx].any(0).float().argmax())  # the first column a remaining row attends to
        self.mask, self.last = self.mask[idx, start:], self.last[idx.to(self.last.device)]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, start:], layer.values[idx, :, start:]

    def _pick(self, logits: Tensor, rows: list[Row]) -> Tensor:
        """The next token per row: argmax, or a sample at the row's temperature and top-p."""
        nxt = logits.argmax(-1)
        for i, r in enumerate(rows):
            s = r.sampling
            if s.do_sample:
                probs = torch.softmax(logits[i].float() / s.temperature, -1)
                if s.top_p < 1:
                    sp, si = probs.sort(descending=True)
                    cut = sp.cumsum(0) - sp > s.top_p  # keep the smallest head whose mass reaches top_p
                    probs = torch.zeros_like(probs).scatter(0, si, sp.masked_fill(cut, 0))
                nxt[i] = torch.multinomial(probs.cpu(), 1, generator=r.generator)[0]
        return nxt

    def _append(self, r: Row, token: int) -> None:
        if token in self.eos:
            r.finish = "stop"
        else:
            r.out.append(token)
            r.text = self.tok.decode(r.out, skip_special_tokens=True)
            cut = _stop_at(r.text, r.sampling.stop, len(r.text) - 64 - max(map(len, r.sampling.stop), default=0))
            if cut is not None:
                r.text, r.finish = r.text[:cut], "stop"
            elif len(r.out) >= r.sampling.max_new_tokens:
                r.finish = "length"
        if r.on_text is not None:
            safe = len(r.text) if r.finish else _safe_end(r.text, r.sampling.stop)
            if safe > r.shown:
                piece, r.shown = r.text[r.shown: safe], safe
                r.on_text(r, piece)


class PrefixCache:
    """The KV cache of one token prefix that many prompts share (the chat template's system turn), per adapter.

    The keys and values of a prefix depend on the adapter (adapters change k_proj, v_proj and every layer below),
    so each single adapter gets its own entry, computed on first use and dropped when any adapter parameters
    change. Saves the prefix's share of every prefill (SmolLM2's default system turn: 25 of ~80 tokens of a
    short chat request)."""

    def __init__(self, mtm: MultiTaskModel, ids: list[int]):
        self.mtm, self.ids = mtm, list(ids)
        self.entries: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self._version: tuple = ()

    def fits(self, row: Row) -> bool:
        return len(self.ids) > 0 and len(row.ids) > len(self.ids) and row.ids[: len(self.ids)] == self.ids and \
            len(row.adapter_ids) == 1 and float(row.adapter_weights[0]) == 1.0

    def _entry(self, adapter: int) -> list[tuple[Tensor, Tensor]]:
        version = tuple((id(g.flat), g.flat._version) for g in self.mtm.groups)
        if version != self._version:
            self.entries, self._version = {}, version
        if adapter not in self.entries:
            ids = torch.tensor([self.ids], device=self.mtm.device)
            with self.mtm.routed(torch.tensor([adapter])):
                out = self.mtm.lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
                                  logits_to_keep=1)
            self.entries[adapter] = [(layer.keys, layer.values) for layer in out.cache.layers]
        return self.entries[adapter]

    def stacked(self, rows: list[Row]):
        """A fresh cache holding each row's prefix under its adapter, rows along the batch."""
        from transformers import DynamicCache

        per_row = [self._entry(int(r.adapter_ids[0])) for r in rows]
        layers = [(torch.cat([e[i][0] for e in per_row]), torch.cat([e[i][1] for e in per_row]))
                  for i in range(len(per_row[0]))]
        return DynamicCache(ddp_cache_data=layers)


def rows_routing(rows: list[Row]) -> Routing:
    """(N, K) adapter ids and weights of rows; a row with fewer choices pads with Theta at weight 0."""
    k = max(len(r.adapter_ids) for r in rows)
    ids = torch.full((len(rows), k), GLOBAL, dtype=torch.long)
    w = torch.zeros(len(rows), k)
    for i, r in enumerate(rows):
        ids[i, : len(r.adapter_ids)], w[i, : len(r.adapter_ids)] = r.adapter_ids, r.adapter_weights
    return Routing(ids, w)


def length_groups(rows: list, length: Callable[[object], int], overhead: int) -> list[list]:
    """Rows split into runs of similar length that minimise the tokens a left-padded prefill computes: each group
    costs ``overhead`` plus its rows times its longest length (an exact partition of the rows sorted by length,
    by dynamic programming). A prefill is compute-bound on the CPU, so padding is time: 16 chat requests of
    49-73 tokens measured 18% padding in one forward."""
    rows = sorted(rows, key=length)
    lens = [length(r) for r in rows]
    best = [0.0] + [float("inf")] * len(rows)  # best[j]: the cost of the first j rows
    cut = [0] * (len(rows) + 1)
    for j in range(1, len(rows) + 1):
        for i in range(j):  # rows i..j-1 as one group, padded to lens[j - 1]
            cost = best[i] + overhead + (j - i) * lens[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(rows)
    while j > 0:
        groups.append(rows[cut[j]: j])
        j = cut[j]
    return groups[::-1]


def _positions(mask: Tensor) -> Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _join(cache, mask: Tensor, new_cache, new_mask: Tensor):
    """Concatenate two left-padded caches along the batch, padding the shorter on the left."""
    la, lb = mask.shape[1], new_mask.shape[1]
    width = max(la, lb)

    def pad(t: Tensor, n: int, dim: int) -> Tensor:
        if n == 0:
            return t
        shape = list(t.shape)
        shape[dim] = n
        return torch.cat([t.new_zeros(shape), t], dim)

    for old, new in zip(cache.layers, new_cache.layers):
        old.keys = torch.cat([pad(old.keys, width - la, 2), pad(new.keys, width - lb, 2)])
        old.values = torch.cat([pad(old.values, width - la, 2), pad(new.values, width - lb, 2)])
    return cache, torch.cat([pad(mask, width - la, 1), pad(new_mask, width - lb, 1)])


def _stop_at(text: str, stops: tuple[str, ...], start: int) -> int | None:
    """Where the first stop string begins in text (searching from ``start``), or None."""
    found = [i for i in (text.find(s, max(0, start)) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of an unfinished row's text can be shown: not a trailing partial character (U+FFFD from an
    incomplete byte sequence) nor a tail that may still grow into a stop string."""
    end = len(text.rstrip("\ufffd"))
    held = [next((k for k in range(min(len(s) - 1, end), 0, -1) if text[:end].endswith(s[:k])), 0) for s in stops]
    return end - max(held, default=0)
