"""Multi-task inference: route each prompt, then generate for all of them in one batch.

Rows of one batch may use different tasks, blends of tasks, or the global Theta: the per-row routing
((N, K) adapter ids and weights) is set on the stacked layers once, and every prefill and decode step
of ``generate`` applies it row by row, with the KV cache, greedy or sampling. Prompts are left-padded;
transformers derives positions from the attention mask, so each row generates what it would alone.

    engine = Engine.from_workspace("tasks.yaml")
    for g in engine.generate(["Shares in the bank fell...", "The striker scored twice..."], max_new_tokens=32):
        print(g.route.task, g.text)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from models.multitask import MultiTaskModel
from models.stacked import GLOBAL

from .router import GLOBAL_NAME, Route, Router, RouterError, global_id

log = logging.getLogger("borahub")


@dataclass
class Generation:
    prompt: str
    text: str  # the generated continuation only
    route: Route
    prompt_tokens: int  # after the chat template and any truncation
    truncated: bool = False

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, **self.route.to_json(),
                "prompt_tokens": self.prompt_tokens, "truncated": self.truncated}


def clean_text(text, where: str) -> str:
    """A prompt as valid Unicode: lone surrogates (e.g. from JSON escapes of broken bytes) become U+FFFD."""
    if not isinstance(text, str):
        raise RouterError(f"{where}: expected a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        log.warning("%s: invalid Unicode (lone surrogates) replaced by U+FFFD", where)
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)


def routing_tensors(routes: list[Route], mtm: MultiTaskModel) -> tuple[Tensor, Tensor]:
    """(N, K) adapter ids and weights for ``mtm.route``; unused choices are Theta with weight 0."""
    k = max(len(r.weights) for r in routes)
    ids = torch.full((len(routes), k), GLOBAL, dtype=torch.long)
    weights = torch.zeros(len(routes), k)
    for i, r in enumerate(routes):
        for j, (name, w) in enumerate(r.weights.items()):
            ids[i, j], weights[i, j] = global_id(name, mtm), w
    return ids, weights


class Engine:
    """A trained hub ready for inference: routing, batched mixed-task generation, the Python API.

    max_input_tokens: prompts longer than this keep their last tokens (with a warning).
    batch_size: prompts per generate call; prompts of similar length share a batch.
    """

    def __init__(self, mtm: MultiTaskModel, router: Router | None = None, max_input_tokens: int = 1024,
                 batch_size: int = 16, router_error: RouterError | None = None):
        self.mtm, self.router = mtm.eval(), router
        self.tok = mtm.tokenizer
        self.max_input_tokens, self.batch_size = max_input_tokens, batch_size
        self._router_error = router_error

    @classmethod
    def from_workspace(cls, config: str | Path = "tasks.yaml", **kw) -> "Engine":
        """Open the trained hub of a registry. A missing or stale router only matters once a prompt
        needs routing (explicit task overrides work without one)."""
        from .workspace import Workspace

        ws = Workspace(config)
        mtm, _ = ws.trained_model()
        try:
            router, error = Router.load(ws.store, mtm), None
        except RouterError as e:
            router, error = None, e
        return cls(mtm, router, router_error=error, **kw)

    @property
    def adapters(self) -> list[str]:
        """Names an override may use: every task of the hub, and GLOBAL_NAME for Theta."""
        return [*self.mtm.task_names, GLOBAL_NAME]

    def _overrides(self, task, n: int) -> list[str | None]:
        names = [task] * n if task is None or isinstance(task, str) else list(task)
        if len(names) != n:
            raise RouterError(f"task overrides: got {len(names)} for {n} prompts")
        unknown = sorted({t for t in names if t is not None and t not in self.adapters})
        if unknown:
            raise RouterError(f"unknown task(s) {', '.join(map(repr, unknown))} "
                              f"(tasks: {', '.join(self.mtm.task_names)}; {GLOBAL_NAME} = the global adapter)")
        return names

    def route(self, texts: list[str], mode: str = "fallback", top_k: int = 2, task=None,
              scorer: str = "classifier", candidates: int | None = None) -> list[Route]:
        """One Route per text. ``task``: a name for every text, or a list with a name or None (route it)
        per text. Modes: select | blend | fallback; scorers: classifier | bayes."""
        texts = [clean_text(t, f"prompt {i + 1}") for i, t in enumerate(texts)]
        names = self._overrides(task, len(texts))
        routes: list[Route | None] = [None if t is None else Route(t, {t: 1.0}, t == GLOBAL_NAME, "override")
                                      for t in names]
        todo = [i for i, r in enumerate(routes) if r is None]
        if todo:
            if self.router is None:
                raise self._router_error or RouterError("no router loaded; pass a task override")
            found = self.router.route(self.mtm, [texts[i] for i in todo], mode, top_k, scorer, candidates)
            for i, r in zip(todo, found):
                routes[i] = r
        return routes

    def _encode(self, prompt: str, chat: bool, budget: int, where: str) -> tuple[list[int], bool]:
        tok = self.tok
        body = tok(prompt, add_special_tokens=False, verbose=False)["input_ids"]
        truncated = len(body) > budget
        if truncated:
            log.warning("%s: %d tokens, kept the last %d", where, len(body), budget)
            prompt = tok.decode(body[-budget:])
        if chat and tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt)["input_ids"]
        if not ids:  # an empty prompt without a template: start from BOS (or EOS)
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ids = [start]
        return ids, truncated

    @torch.no_grad()
    def generate(self, prompts: list[str], *, task=None, mode: str = "fallback", top_k: int = 2,
                 scorer: str = "classifier", candidates: int | None = None, routes: list[Route] | None = None,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, chat: bool = True) -> list[Generation]:
        """Route (unless ``routes`` are given) and generate for every prompt; rows mix tasks freely.

        chat: wrap each prompt in the tokenizer's chat template when it has one.
        """
        from transformers import GenerationConfig

        if max_new_tokens < 1:
            raise RouterError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise RouterError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
        prompts = [clean_text(p, f"prompt {i + 1}") for i, p in enumerate(prompts)]
        if routes is None:
            routes = self.route(prompts, mode, top_k, task, scorer, candidates)
        if len(routes) != len(prompts):
            raise RouterError(f"got {len(routes)} routes for {len(prompts)} prompts")
        lm, tok = self.mtm.lm, self.tok
        limit = getattr(lm.config, "max_position_embeddings", None)
        if limit is not None and max_new_tokens >= limit:
            raise RouterError(f"max_new_tokens {max_new_tokens}: the model's context holds {limit} tokens, "
                              "prompt included; ask for fewer")
        budget = self.max_input_tokens if limit is None else min(self.max_input_tokens, limit - max_new_tokens)
        encoded = [self._encode(p, chat, budget, f"prompt {i + 1}") for i, p in enumerate(prompts)]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gc = lm.generation_config
        cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad,
                               eos_token_id=gc.eos_token_id if gc.eos_token_id is not None else tok.eos_token_id,
                               bos_token_id=gc.bos_token_id, use_cache=True,
                               **({"temperature": temperature, "top_p": top_p} if do_sample else {}))
        if seed is not None:
            torch.manual_seed(seed)
        texts = [""] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i][0]))
        try:
            for s in range(0, len(order), self.batch_size):
                idx = order[s: s + self.batch_size]
                width = max(len(encoded[i][0]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):  # left padding
                    seq = encoded[i][0]
                    ids[row, width - len(seq):] = torch.tensor(seq)
                    mask[row, width - len(seq):] = 1
                self.mtm.route(*routing_tensors([routes[i] for i in idx], self.mtm))
                out = lm.generate(input_ids=ids.to(self.mtm.device), attention_mask=mask.to(self.mtm.device),
                                  generation_config=cfg)
                for row, i in enumerate(idx):
                    texts[i] = tok.decode(out[row, width:], skip_special_tokens=True)
        finally:
            self.mtm.route(None)
        return [Generation(p, t, r, len(e[0]), e[1]) for p, t, r, e in zip(prompts, texts, routes, encoded)]
