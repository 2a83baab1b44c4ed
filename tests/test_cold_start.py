"""A new task trained alone against the stored prior: starts at Theta, moves, leaves everything else alone."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hub import store
from hub.cli import main

LR, STEPS = 0.01, 4
FIRST = "model.layers.0.self_attn.q_proj:A"


def add_new_task(cfg: Path, tau: float | None = None) -> None:
    """Register task 'news' (finance-like sentences) with `borahub tasks add`; optionally set tau."""
    rng = random.Random(1)
    words = "the bank raised rates stocks fell bonds rallied investors sold shares in the market".split()
    (cfg.parent / "news.jsonl").write_text("".join(json.dumps({"text": " ".join(rng.sample(words, 8))}) + "\n"
                                                   for _ in range(12)))
    (cfg.parent / "new.yaml").write_text(yaml.safe_dump({"name": "news", "data": {"path": "news.jsonl"}}))
    assert main(["--config", str(cfg), "tasks", "add", str(cfg.parent / "new.yaml")]) == 0
    if tau is not None:
        raw = yaml.safe_load(cfg.read_text())
        raw["prior"]["tau"] = tau
        cfg.write_text(yaml.safe_dump(raw, sort_keys=False))


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].reshape(-1) for k in sorted(tensors)])


def theta_of(store_dir: Path) -> dict[str, torch.Tensor]:
    return {k.split("/", 1)[1]: v for k, v in load_file(str(store_dir / store.GLOBAL_FILE)).items()}


@pytest.fixture
def hubs(tiny_hub, tmp_path) -> dict[str, Path]:
    """Two copies of a trained tiny hub, each with the new task registered: prior tau 1e4 and tau 0."""
    out = {}
    for name, tau in (("strong", 1e4), ("none", 0.0)):
        root = tmp_path / name
        shutil.copytree(tiny_hub.parent, root, ignore=shutil.ignore_patterns("store-checkpoint", "strong", "none"))
        add_new_task(root / "tasks.yaml", tau)
        out[name] = root / "tasks.yaml"
    return out


def test_new_task_trains_alone_from_theta(hubs, capsys):
    cfg = hubs["strong"]
    store_dir = cfg.parent / "store"
    before = {p.relative_to(store_dir).as_posix(): p.read_bytes() for p in store_dir.rglob("*.safetensors")}
    Theta = theta_of(store_dir)

    assert main(["--config", str(cfg), "train", "--tasks", "news", "--steps", str(STEPS), "--quiet"]) == 0

    after = {p.relative_to(store_dir).as_posix(): p.read_bytes() for p in store_dir.rglob("*.safetensors")}
    assert set(after) - set(before) == {f"news/{store.NATIVE_FILE}", f"news/{store.PEFT_WEIGHTS}"}
    assert all(after[k] == v for k, v in before.items())  # other tasks and Theta bit-identical
    new = load_file(str(store_dir / "news" / store.NATIVE_FILE))
    step = (flat(new) - flat(Theta)).abs().max()
    # Adam moves each entry by at most ~lr per step, so a start at Theta (+1e-4 noise) stays within
    # STEPS * lr of it; a fresh LoRA init would sit ~1/sqrt(64) = 0.125 away.
    assert 1e-3 < step < STEPS * LR + 1e-3
    state = store.read_state(store_dir)
    assert [t["name"] for t in state["tasks"]] == ["cooking", "finance", "sport", "news"]
    assert state["tasks"][3]["n_train"] == 10


def test_prior_still_pulls_the_new_task_towards_theta(hubs):
    dist = {}
    for name, cfg in hubs.items():
        assert main(["--config", str(cfg), "train", "--tasks", "news", "--steps", str(STEPS), "--quiet"]) == 0
        store_dir = cfg.parent / "store"
        dist[name] = float((flat(load_file(str(store_dir / "news" / store.NATIVE_FILE))) - flat(theta_of(store_dir))).norm())
    assert dist["strong"] < 0.5 * dist["none"]
