"""Corrupted stores, table-driven: every command that reads the store (eval, route, generate, export, push)
answers exit 2 with one line naming the file, no traceback, and leaves the project byte-identical."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_bad_registries import assert_one_line_error, checksums, run_cli

EVAL = ["eval", "--max-docs", "2"]
ROUTE = ["route", "stir the soup"]
GENERATE = ["generate", "--task", "cooking", "--max-new-tokens", "2", "stir"]
EXPORT = ["export", "cooking", "--out", "exported"]
PUSH = ["push", "tester/never-reached", "--no-eval"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir) -> Path:
    from conftest import write_tiny_registry
    from hub.workspace import Workspace

    cfg = write_tiny_registry(tmp_path_factory.mktemp("trained"), tiny_model_dir)
    Workspace(cfg).train(progress=False)
    return cfg


def edit_state(fn):
    def apply(store: Path) -> None:
        state = json.loads((store / "hub.json").read_text())
        fn(state)
        (store / "hub.json").write_text(json.dumps(state))
    return apply


def write(rel: str, data):
    return lambda store: (store / rel).write_bytes(data(store / rel) if callable(data) else data)


def reshaped(path: Path) -> bytes:
    tensors = load_file(str(path))
    key = next(iter(tensors))
    tmp = path.with_suffix(".tmp")
    save_file({**tensors, key: torch.zeros(3, 3)}, str(tmp))
    data = tmp.read_bytes()
    tmp.unlink()
    return data


def to_outside(rel: str):
    """Replace a store file by a symlink to an identical copy outside the store."""
    def apply(store: Path) -> None:
        outside = store.parent.parent / "outside.bin"
        shutil.copyfile(store / rel, outside)
        (store / rel).unlink()
        (store / rel).symlink_to(outside)
    return apply


PICKLE = pickle.dumps({"weight": [1.0, 2.0]})
CASES = {
    "hub.json not JSON": (write("hub.json", b"{not json"), EVAL, "hub.json: not valid JSON"),
    "hub.json a list": (write("hub.json", b"[1, 2]"), ROUTE, "not a BoRA Hub store"),
    "hub.json nested deep": (write("hub.json", b"[" * 100000 + b"]" * 100000), EVAL, "hub.json: not valid JSON"),
    "no store marker": (edit_state(lambda s: s.pop("borahub")), EVAL, "not a BoRA Hub store"),
    "tasks missing": (edit_state(lambda s: s.pop("tasks")), EXPORT, "hub.json: malformed (tasks: Field required)"),
    "groups wrong shape": (edit_state(lambda s: s.__setitem__("groups", {"a": 1})), EVAL, "malformed (groups"),
    "fingerprint missing": (edit_state(lambda s: s.pop("fingerprint")), EVAL, "malformed (fingerprint"),
    "format 2": (edit_state(lambda s: s.__setitem__("format", 2)), EVAL, "unsupported store format 2"),
    "task name traversal": (edit_state(lambda s: s["tasks"][0].__setitem__("name", "../../evil")), EVAL,
                            "invalid task name '../../evil'"),
    "task name absolute": (edit_state(lambda s: s["tasks"][0].__setitem__("name", "/etc")), PUSH,
                           "invalid task name '/etc'"),
    "file list traversal": (edit_state(lambda s: s["files"].__setitem__("../outside.bin",
                                                                        next(iter(s["files"].values())))),
                            EVAL, "is not a plain relative path"),
    "PEFT weights truncated": (write("cooking/adapter_model.safetensors", lambda p: p.read_bytes()[:100]), EXPORT,
                               "cooking/adapter_model.safetensors: changed since it was saved"),
    "PEFT weights pickled": (write("cooking/adapter_model.safetensors", PICKLE), PUSH,
                             "cooking/adapter_model.safetensors: changed since it was saved"),
    "PEFT weights reshaped": (write("finance/adapter_model.safetensors", reshaped), EVAL,
                              "finance/adapter_model.safetensors: changed since it was saved"),
    "native truncated": (write("sport/native.safetensors", lambda p: p.read_bytes()[:64]), ROUTE,
                         "sport/native.safetensors: changed since it was saved"),
    "native pickled": (write("cooking/native.safetensors", PICKLE), GENERATE,
                       "cooking/native.safetensors: changed since it was saved"),
    "Theta missing": (lambda s: (s / "global.safetensors").unlink(), EVAL, "global.safetensors: missing"),
    "task folder missing": (lambda s: shutil.rmtree(s / "finance"), EVAL, "finance/adapter_config.json: missing"),
    "file is a link outside": (to_outside("cooking/native.safetensors"), EVAL, "leads outside"),
    "router.json not JSON": (write("router.json", b"{"), ROUTE, "router.json: not valid JSON"),
    "router tensors truncated": (write("router.safetensors", lambda p: p.read_bytes()[:50]), ROUTE,
                                 "router.safetensors: missing or not the file"),
    "router tasks not a list": (lambda s: _edit_router(s, lambda m: m.__setitem__("tasks", 3)), ROUTE,
                                "router.json: malformed"),
    "router thresholds missing": (lambda s: _edit_router(s, lambda m: m.pop("thresholds")), ROUTE,
                                  "router.json: malformed router"),
}


def _edit_router(store: Path, fn) -> None:
    meta = json.loads((store / "router.json").read_text())
    fn(meta)
    (store / "router.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("case", list(CASES))
def test_corrupted_store_is_one_line_exit_2_and_changes_nothing(case, trained, tmp_path, capsys, monkeypatch):
    corrupt, argv, expected = CASES[case]
    project = tmp_path / "project"
    shutil.copytree(trained.parent, project, symlinks=True)
    corrupt(project / "store")
    monkeypatch.chdir(project)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # push must fail on the store, before any request
    before = checksums(tmp_path)
    assert_one_line_error(*run_cli(["--config", str(project / "tasks.yaml"), *argv], capsys), expected)
    assert checksums(tmp_path) == before


def test_intact_store_passes_every_command(trained, tmp_path, capsys, monkeypatch):
    """The table's commands work on the uncorrupted copy (so the errors above come from the corruption)."""
    project = tmp_path / "project"
    shutil.copytree(trained.parent, project)
    monkeypatch.chdir(project)
    for argv in (EVAL, ROUTE, GENERATE, EXPORT):
        assert run_cli(["--config", str(project / "tasks.yaml"), *argv], capsys)[0] == 0, argv
