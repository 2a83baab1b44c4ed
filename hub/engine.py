"""Multi-task inference: route each prompt, then generate for all of them in one batch.

Rows of one batch may use different tasks, blends of tasks, or the global Theta: each forward of the decode
loop (hub/decode.py) carries the rows' routing ((N, K) adapter ids and weights), with the KV cache, greedy or
sampling; a finished row's place goes to the next prompt. Prompts are left-padded and positions follow the
attention mask, so each row generates what it would alone.

    engine = Engine.from_workspace("tasks.yaml")
    for g in engine.generate(["Shares in the bank fell...", "The striker scored twice..."], max_new_tokens=32):
        print(g.route.task, g.text)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from models import kernels
from models.multitask import MultiTaskModel

from .decode import DecodeBatch, PrefixCache, Row, Sampling
from .prompting import Prompter
from .router import GLOBAL_NAME, Route, Router, RouterError, global_id

log = logging.getLogger("borahub")


@dataclass
class Generation:
    prompt: str
    text: str  # the generated continuation only
    route: Route
    prompt_tokens: int  # after the chat template and any truncation
    truncated: bool = False
    finish_reason: str = "stop"  # stop (EOS or a stop string) | length
    completion_tokens: int = 0

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "text": self.text, **self.route.to_json(),
                "prompt_tokens": self.prompt_tokens, "truncated": self.truncated,
                "finish_reason": self.finish_reason, "completion_tokens": self.completion_tokens}


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


class Engine:
    """A trained hub ready for inference: routing, batched mixed-task generation, the Python API.

    max_input_tokens: prompts longer than this keep their last tokens (with a warning).
    batch_size: prompts per generate call; prompts of similar length share a batch.
    """

    def __init__(self, mtm: MultiTaskModel, router: Router | None = None, max_input_tokens: int = 1024,
                 batch_size: int = 16, router_error: RouterError | None = None,
                 templates: dict[str, str] | None = None):
        self.mtm, self.router = mtm.eval(), router
        self.tok = mtm.tokenizer
        self.prompter = Prompter(self.tok, templates)  # task -> prompt template (train/serve parity)
        self.prefixes = PrefixCache(mtm, self.prompter.chat_prefix())  # the chat system turn's KV, per adapter
        kernels.tune(mtm.lm)  # float32 on the CPU: MKL or oneDNN per weight shape, timed once (models/kernels.py)
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
        return cls(mtm, router, router_error=error, templates=ws.templates(mtm.task_names), **kw)

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

    def budget(self, max_new_tokens: int) -> int:
        """Prompt tokens allowed for ``max_new_tokens`` new ones (raises when the context cannot hold them)."""
        if max_new_tokens < 1:
            raise RouterError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        limit = getattr(self.mtm.lm.config, "max_position_embeddings", None)
        if limit is not None and max_new_tokens >= limit:
            raise RouterError(f"max_new_tokens {max_new_tokens}: the model's context holds {limit} tokens, "
                              "prompt included; ask for fewer")
        return self.max_input_tokens if limit is None else min(self.max_input_tokens, limit - max_new_tokens)

    def _encode(self, prompt: str, chat: bool, budget: int, where: str, task: str | None = None,
                messages: list[dict] | None = None) -> tuple[list[int], bool]:
        return self.prompter.encode(prompt, task, chat=chat, budget=budget, where=where, messages=messages)

    def row(self, ids: list[int], route: Route, sampling: Sampling, on_text=None) -> Row:
        """A decoding row for prompt ids served by ``route``'s adapters."""
        adapter_ids = torch.tensor([global_id(n, self.mtm) for n in route.weights], dtype=torch.long)
        return Row(ids, adapter_ids, torch.tensor(list(route.weights.values()), dtype=torch.float32), sampling, on_text)

    def run(self, rows: list[Row]) -> None:
        """Decode rows to the end, at most ``batch_size`` at once: a finished row's place goes to the next one
        at the following step (rows of similar prompt length are admitted together)."""
        batch, pending = DecodeBatch(self.mtm, self.prefixes), sorted(rows, key=lambda r: len(r.ids))
        while pending or len(batch):
            free = self.batch_size - len(batch)
            if free > 0 and pending:
                batch.add(pending[:free])
                pending = pending[free:]
            else:
                batch.step()
            batch.drop(batch.finished())

    @torch.no_grad()
    def generate(self, prompts: list[str], *, task=None, mode: str = "fallback", top_k: int = 2,
                 scorer: str = "classifier", candidates: int | None = None, routes: list[Route] | None = None,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int | None = None, chat: bool = True, stop: list[str] | None = None) -> list[Generation]:
        """Route (unless ``routes`` are given) and generate for every prompt; rows mix tasks freely. What text
        reaches the model: hub/prompting.py (a task's prompt template, else the chat template when ``chat``).

        seed: with ``do_sample``, every row samples from its own generator seeded with it (a row samples
        the same tokens alone or in a batch). stop: strings that end a row (not included in its text).
        """
        budget = self.budget(max_new_tokens)
        if do_sample and (temperature <= 0 or not 0 < top_p <= 1):
            raise RouterError(f"sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
        prompts = [clean_text(p, f"prompt {i + 1}") for i, p in enumerate(prompts)]
        if routes is None:
            routes = self.route(prompts, mode, top_k, task, scorer, candidates)
        if len(routes) != len(prompts):
            raise RouterError(f"got {len(routes)} routes for {len(prompts)} prompts")
        sampling = Sampling(max_new_tokens, do_sample, temperature, top_p, seed, tuple(stop or ()))
        encoded = [self._encode(p, chat, budget, f"prompt {i + 1}", r.task)
                   for i, (p, r) in enumerate(zip(prompts, routes))]
        rows = [self.row(ids, r, sampling) for (ids, _), r in zip(encoded, routes)]
        self.run(rows)
        return [Generation(p, row.text, r, len(e[0]), e[1], row.finish or "stop", len(row.out))
                for p, row, r, e in zip(prompts, rows, routes, encoded)]
