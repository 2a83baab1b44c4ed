"""Hostile repos, table-driven: a repo whose manifest or files try to write outside the project, smuggle
pickles or wrong shapes, or fill the disk. Each pull through the CLI is exit 2 with one line, and the
project and its surroundings are byte-identical afterwards (the real client against tests/hubserver.py)."""
from __future__ import annotations

import hashlib
import json
import pickle
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import CommitOperationAdd, hf_hub_download
from safetensors.torch import load, save

from conftest import TOKEN
from hub import remote
from hub.cli import main
from test_bad_registries import assert_one_line_error, checksums, run_cli

NATIVE = "sport/native.safetensors"


def set_file(m: dict, up: dict, rel: str, data: bytes) -> None:
    """Upload ``data`` at ``rel`` and make the manifest vouch for it (size and SHA-256)."""
    up[rel] = data
    m["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def reshaped_native(orig) -> bytes:
    tensors = load(orig(NATIVE))
    key = next(iter(tensors))
    return save({**tensors, key: torch.zeros(2, 2)})


def flipped(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def edited_hub_json(m: dict, up: dict, orig) -> None:
    state = json.loads(orig("hub.json"))
    state["tasks"] = state["tasks"][:1]
    set_file(m, up, "hub.json", json.dumps(state).encode())


def task_field(i: int, key: str, value):
    return lambda m, up, orig: m["tasks"][i].__setitem__(key, value)


def router(entries: list[str]):
    return lambda m, up, orig: m.__setitem__("router", entries)


# id: (change(manifest, uploads, original_bytes) -> raw manifest bytes or None, expected in the error line)
CASES = {
    "router entry climbs out": (router(["../../evil.txt"]), "router file '../../evil.txt' is not a plain file"),
    "router entry absolute": (router(["/tmp/borahub-evil.txt"]), "is not a plain file name"),
    "router entry in a folder": (router(["sub/../../x"]), "is not a plain file name"),
    "router entry is hub.json": (router(["hub.json"]), "router file 'hub.json' is not a plain file name"),
    "router entry is a task": (router(["router.json", "sport"]), "router file 'sport' is also a task name"),
    "task name climbs out": (task_field(0, "name", "../escape"), "invalid task name '../escape'"),
    "task name absolute": (task_field(0, "name", "/etc/cron.d/x"), "invalid task name"),
    "task name reserved": (task_field(0, "name", "router.json"), "task name 'router.json' is reserved"),
    "task name twice": (task_field(1, "name", "cooking"), "a task name appears twice"),
    "file entry climbs out": (lambda m, up, orig: m["files"].__setitem__("../../x", m["files"]["hub.json"]),
                              "is not a plain relative path"),
    "data id is a local path": (lambda m, up, orig: m["tasks"][2]["spec"].__setitem__("data", {"hub": "../../etc"}),
                                "not a Hub dataset id"),
    "declared size too large": (lambda m, up, orig: m["files"][NATIVE].__setitem__("size", 10**10),
                                "more than its shapes allow"),
    "shapes implausible": (lambda m, up, orig: m["groups"][0]["shapes"].__setitem__("x", [10**9, 10**9]),
                           "has shape [1000000000, 1000000000]"),
    "repo file larger than declared": (lambda m, up, orig: up.__setitem__(NATIVE, orig(NATIVE) + b"\0" * 4096),
                                       f"{NATIVE} has"),
    "same size, other bytes": (lambda m, up, orig: up.__setitem__(NATIVE, flipped(orig(NATIVE))),
                               f"{NATIVE} is corrupt or truncated"),
    "pickle vouched for": (lambda m, up, orig: set_file(m, up, NATIVE, pickle.dumps({"w": [1.0]})),
                           "corrupt safetensors file"),
    "wrong shape vouched for": (lambda m, up, orig: set_file(m, up, NATIVE, reshaped_native(orig)), "has shape (2, 2)"),
    "hub.json disagrees": (edited_hub_json, "hub.json and borahub.json disagree"),
    "manifest not JSON": (lambda m, up, orig: b"{oops", "borahub.json is not valid JSON"),
    "manifest nested deep": (lambda m, up, orig: b"[" * 100000 + b"]" * 100000, "borahub.json is not valid JSON"),
    "manifest too large": (lambda m, up, orig: b" " * (16 * 2**20 + 1) + b"{}", "borahub.json is larger than"),
    "manifest wrong shape": (lambda m, up, orig: json.dumps({**m, "groups": 5}).encode(), "not a BoRA Hub manifest"),
}


@pytest.fixture(scope="module")
def original(pushed, server):
    repo_id, _ = pushed

    def read(rel: str) -> bytes:
        return Path(hf_hub_download(repo_id, rel, endpoint=server.url, token=TOKEN)).read_bytes()
    return read


def hostile_branch(api, repo_id: str, change, original) -> str:
    manifest, uploads = json.loads(original(remote.MANIFEST)), {}
    raw = change(manifest, uploads, original)
    uploads[remote.MANIFEST] = raw if isinstance(raw, bytes) else json.dumps(manifest).encode()
    branch = f"hostile-{uuid.uuid4().hex[:8]}"
    api.create_branch(repo_id, branch=branch)
    api.create_commit(repo_id, [CommitOperationAdd(rel, data) for rel, data in uploads.items()],
                      commit_message="hostile", revision=branch)
    return branch


def fresh_project(root: Path, model_dir: Path) -> Path:
    (root / "project").mkdir(parents=True)
    (root / "outside").mkdir()
    (root / "outside" / "keep.txt").write_text("outside the project")
    cfg = root / "project" / "tasks.yaml"
    cfg.write_text(yaml.safe_dump({"base_model": str(model_dir), "store": "store", "tasks": []}))
    return cfg


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_repo_is_refused_and_writes_nothing(case, server, api, pushed, original, tiny_model_dir, tmp_path,
                                                    capsys, monkeypatch):
    change, expected = CASES[case]
    repo_id, _ = pushed
    branch = hostile_branch(api, repo_id, change, original)
    cfg = fresh_project(tmp_path, tiny_model_dir)
    monkeypatch.chdir(cfg.parent)
    before = checksums(tmp_path)
    assert_one_line_error(*run_cli(["--config", str(cfg), "pull", repo_id, "--revision", branch], capsys), expected)
    assert checksums(tmp_path) == before
    assert not Path("/tmp/borahub-evil.txt").exists()


def test_store_that_is_a_link_out_of_the_project_is_refused(pushed, tiny_model_dir, tmp_path, capsys):
    cfg = fresh_project(tmp_path, tiny_model_dir)
    (cfg.parent / "store").symlink_to(tmp_path / "outside")
    before = checksums(tmp_path)
    code, err = run_cli(["--config", str(cfg), "pull", pushed[0]], capsys)
    assert_one_line_error(code, err, "exists and is not a folder")
    assert checksums(tmp_path) == before


def test_pulled_spec_never_points_at_a_local_file(server, api, pushed, original, tiny_model_dir, tmp_path, capsys):
    """A spec whose data is a local path (absolute, or one that happens to exist here) is registered without
    data: training it would read a file of this machine chosen by the repo."""
    repo_id, _ = pushed
    (tmp_path / "project").mkdir()
    secret = tmp_path / "project" / "secret.txt"
    secret.write_text("a b c\n" * 10)

    def change(m, up, orig):
        m["tasks"][0]["spec"]["data"] = {"path": "/etc/passwd"}
        m["tasks"][1]["spec"]["data"] = {"path": "secret.txt"}
    branch = hostile_branch(api, repo_id, change, original)
    cfg = tmp_path / "project" / "tasks.yaml"
    cfg.write_text(yaml.safe_dump({"base_model": str(tiny_model_dir), "store": "store", "tasks": []}))
    assert main(["--config", str(cfg), "pull", repo_id, "--revision", branch]) == 0
    assert "registered without data" in capsys.readouterr().out
    tasks = yaml.safe_load(cfg.read_text())["tasks"]
    assert [t.get("data") for t in tasks[:2]] == [None, None]
