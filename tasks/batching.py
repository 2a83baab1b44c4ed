"""Tokenisation and mixed-task batches.

A training batch draws each row's task independently (proportional to data size, or balanced), so one
forward serves many tasks. Batches are a pure function of (seed, step): resuming needs no sampler state.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import Example


@dataclass
class Tokenized:
    ids: list[list[int]]  # token ids per example
    n_prompt: list[int]  # leading tokens excluded from the loss


def tokenize(tokenizer, examples: list[Example], max_length: int) -> Tokenized:
    """Prompt tokens are kept but not scored; completions end with EOS when a prompt is given."""
    ids, n_prompt = [], []
    prompts = [e.prompt for e in examples]
    comps = [e.completion + (tokenizer.eos_token or "") if e.prompt else e.completion for e in examples]
    p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if any(prompts) else [[] for _ in examples]
    c_ids = tokenizer(comps, add_special_tokens=False)["input_ids"]
    for p, c in zip(p_ids, c_ids):
        p = p[: max_length - 1]
        seq = (p + c)[:max_length]
        ids.append(seq)
        n_prompt.append(len(p))
    return Tokenized(ids, n_prompt)


def collate(rows: list[tuple[list[int], int]], task_ids: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows; labels are -100 on padding and prompt tokens."""
    n, length = len(rows), max(len(r[0]) for r in rows)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        labels[i, n_prompt: len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "task_ids": torch.tensor(task_ids, dtype=torch.long)}


class MixedBatcher:
    """Deterministic mixed-task training batches over tokenised task data."""

    def __init__(self, data: dict[int, Tokenized], batch_size: int, sampling: str, seed: int, pad_id: int):
        self.data = {t: d for t, d in data.items() if d.ids}
        if not self.data:
            raise ValueError("no training examples")
        self.tasks = np.array(sorted(self.data))
        sizes = np.array([len(self.data[t].ids) for t in self.tasks], dtype=float)
        self.probs = sizes / sizes.sum() if sampling == "proportional" else np.full(len(sizes), 1 / len(sizes))
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id

    def batch(self, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro])
        tasks = rng.choice(self.tasks, size=self.batch_size, p=self.probs)
        rows = []
        for t in tasks:
            d = self.data[int(t)]
            j = int(rng.integers(len(d.ids)))
            rows.append((d.ids[j], d.n_prompt[j]))
        return collate(rows, [int(t) for t in tasks], self.pad_id)


def shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Process ``rank``'s rows (``rank::world``) of a global batch, with ``task_counts``: the global batch's rows
    per task (the likelihood scales each task's rows by its data size over this count, whatever the share)."""
    tids = batch["task_ids"]
    counts = torch.bincount(tids, minlength=int(tids.max()) + 1)
    if world == 1:
        return {**batch, "task_counts": counts}
    out = {k: v[rank::world] for k, v in batch.items()}
    width = int(out["attention_mask"].sum(1).max())  # drop the columns only other processes' rows need
    for k in ("input_ids", "attention_mask", "labels"):
        out[k] = out[k][:, :width]
    return {**out, "task_counts": counts}


def eval_batches(data: Tokenized, task_id: int, batch_size: int, pad_id: int):
    """Every example once, in order, for held-out perplexity."""
    for i in range(0, len(data.ids), batch_size):
        rows = list(zip(data.ids[i: i + batch_size], data.n_prompt[i: i + batch_size]))
        yield collate(rows, [task_id] * len(rows), pad_id)
