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

from conftest import write_tiny_registry
from hub import store
from hub.cli import main
from hub.workspace import Workspace

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


def adapters(store_dir: Path) -> dict[str, bytes]:
    """The bytes of every task's and Theta's safetensors file (the router's is refitted by `train`)."""
    return {p.relative_to(store_dir).as_posix(): p.read_bytes()
            for p in store_dir.rglob("*.safetensors") if p.name != "router.safetensors"}


def flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[k].reshape(-1) for k in sorted(tensors)])


def theta_of(store_dir: Path) -> dict[str, torch.Tensor]:
    return {k.split("/", 1)[1]: v for k, v in load_file(str(store_dir / store.GLOBAL_FILE)).items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> Path:
    """A trained tiny hub (3 tasks, no router): its tasks.yaml."""
    cfg = write_tiny_registry(tmp_path_factory.mktemp("trained"), tiny_model_dir)
    Workspace(cfg).train(progress=False, fit_router=False)
    return cfg


@pytest.fixture
def hubs(trained, tmp_path) -> dict[str, Path]:
    """Two copies of the trained hub, each with the new task registered: prior tau 1e4 and tau 0."""
    out = {}
    for name, tau in (("strong", 1e4), ("none", 0.0)):
        shutil.copytree(trained.parent, tmp_path / name, ignore=shutil.ignore_patterns("store-checkpoint"))
        add_new_task(tmp_path / name / "tasks.yaml", tau)
        out[name] = tmp_path / name / "tasks.yaml"
    return out


def test_new_task_trains_alone_from_theta(hubs, capsys):
    cfg = hubs["strong"]
    store_dir = cfg.parent / "store"
    before = adapters(store_dir)
    Theta = theta_of(store_dir)

    assert main(["--config", str(cfg), "train", "--tasks", "news", "--steps", str(STEPS), "--quiet"]) == 0

    after = adapters(store_dir)
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
        Workspace(cfg).train(["news"], steps=STEPS, progress=False, fit_router=False)
        store_dir = cfg.parent / "store"
        new = flat(load_file(str(store_dir / "news" / store.NATIVE_FILE)))
        dist[name] = float((new - flat(theta_of(store_dir))).norm())
    assert dist["strong"] < 0.5 * dist["none"]
