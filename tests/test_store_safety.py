"""Reproductions of the data-loss defects (each failed before the store-safety change), kept as tests:
stores that were not stores, training that replaced a good store with a bad one, kills mid-save, temp
files of killed runs, the registry's mode and symlink, and file-system refusals."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hub import store
from hub.workspace import Workspace
from test_bad_registries import assert_one_line_error, checksums, run_cli

ROOT = Path(__file__).resolve().parents[1]


def set_key(cfg_path: Path, section: str | None, key: str, value) -> None:
    cfg = yaml.safe_load(cfg_path.read_text())
    (cfg[section] if section else cfg)[key] = value
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def test_store_dot_does_not_delete_the_project(tiny_registry, capsys):
    set_key(tiny_registry, None, "store", ".")
    before = checksums(tiny_registry.parent)
    code, err = run_cli(["--config", str(tiny_registry), "train", "--steps", "1", "--quiet"], capsys)
    assert_one_line_error(code, err, "would contain the registry's folder")
    assert checksums(tiny_registry.parent) == before


def test_store_in_a_users_folder_is_refused(tiny_registry, capsys):
    (tiny_registry.parent / "mydata").mkdir()
    (tiny_registry.parent / "mydata" / "precious.txt").write_text("do not delete")
    set_key(tiny_registry, None, "store", "mydata")
    code, err = run_cli(["--config", str(tiny_registry), "train", "--steps", "1", "--quiet"], capsys)
    assert_one_line_error(code, err, "holds no BoRA Hub store")
    assert (tiny_registry.parent / "mydata" / "precious.txt").read_text() == "do not delete"


def test_a_store_is_replaced_and_recognised(tiny_hub):
    """A trained store carries the marker, so the next training run may replace it (and only it)."""
    state = json.loads((tiny_hub.parent / "store" / "hub.json").read_text())
    assert state["borahub"] == "store" and "cooking/native.safetensors" in state["files"]
    Workspace(tiny_hub).train(steps=1, progress=False)
    assert store.read_state(tiny_hub.parent / "store")["metrics"]["steps"] == 1


@pytest.mark.parametrize("argv,expected", [(["train", "--steps", "-1"], "--steps"),
                                           (["train", "--steps", "0"], "--steps"),
                                           (["eval", "--max-docs", "-1"], "--max-docs")])
def test_bad_counts_leave_a_trained_store_alone(tiny_hub, capsys, argv, expected):
    before = checksums(tiny_hub.parent)
    assert_one_line_error(*run_cli(["--config", str(tiny_hub), *argv], capsys), expected)
    assert checksums(tiny_hub.parent) == before


@pytest.mark.parametrize("section,key,value", [("training", "lr", float("inf")), ("adapter", "alpha", float("inf"))])
def test_non_finite_settings_are_refused(tiny_registry, capsys, section, key, value):
    set_key(tiny_registry, section, key, value)
    code, err = run_cli(["--config", str(tiny_registry), "train", "--steps", "1", "--quiet"], capsys)
    assert_one_line_error(code, err, f"{section}.{key}")
    assert not (tiny_registry.parent / "store").exists()


def test_divergence_stops_training_and_keeps_the_last_good_store(tiny_hub, capsys, monkeypatch):
    """A loss that turns NaN mid-run (here forced at the third step) stops with one line; the stored hub
    stays as it was, and the run's last checkpoint (step 2, a resume point) holds no NaN."""
    import torch
    from safetensors.torch import load_file

    from models.bora import BoraPrior

    before = checksums(tiny_hub.parent / "store")
    real_loss, calls = BoraPrior.loss, [0]

    def loss(self, batch, guide=None):
        calls[0] += 1
        value = real_loss(self, batch, guide)
        return value * float("nan") if calls[0] > 3 else value  # call 1 materialises the guide

    monkeypatch.setattr(BoraPrior, "loss", loss)
    code, err = run_cli(["--config", str(tiny_hub), "train", "--quiet"], capsys)
    assert_one_line_error(code, err, "training diverged at step 3")
    assert checksums(tiny_hub.parent / "store") == before
    ckpt = load_file(str(tiny_hub.parent / "store-checkpoint" / "checkpoint.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in ckpt.values())


def test_save_refuses_non_finite_weights(tiny_hub):
    mtm, state = Workspace(tiny_hub).trained_model()
    before = checksums(tiny_hub.parent)
    mtm.groups[0].flat.data[0, 0] = float("nan")
    from tasks.schema import AdapterSpec

    specs = {t["name"]: AdapterSpec.model_validate(t["adapter"]) for t in state["tasks"]}
    with pytest.raises(store.StoreError, match="NaN or inf"):
        store.save(tiny_hub.parent / "store", mtm, 1.0, {}, specs)
    assert checksums(tiny_hub.parent) == before


@pytest.mark.parametrize("mode", ["exchange", "rename"])
def test_kill_at_any_point_of_a_save_leaves_a_loadable_store(tiny_model_dir, tmp_path, mode):
    """SIGKILL before each file-system operation of a save in turn (tests/kill_save.py). With the atomic
    exchange the store path holds the old or the new store at every instant; with two renames it may be
    briefly missing, and the next command restores the old one. Killed runs leave no temp files behind."""
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "kill_save.py"), str(tiny_model_dir), str(tmp_path),
                          mode], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)
    assert len(rows) >= 20 and all(r["killed"] for r in rows[:-1]) and not rows[-1]["killed"]
    assert rows[-1]["after"] == "new" and rows[0]["after"] == "old"
    assert all(r["after"] in ("old", "new") and r["leftovers"] == [] for r in rows)
    gaps = [r for r in rows if r["at_kill"] is None]
    if mode == "exchange":
        assert gaps == [] and all(r["at_kill"] == r["after"] for r in rows)
    else:
        assert len(gaps) == 1 and gaps[0]["after"] == "old"


def test_temp_files_of_dead_runs_are_cleaned_up(tiny_hub):
    parent = tiny_hub.parent
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (parent / f".store.borahub-tmp.{pid}.abc").mkdir()
    (parent / f".store.borahub-tmp.{pid}.abc" / "global.safetensors").write_bytes(b"partial")
    (parent / f".tasks.yaml.borahub-tmp.{pid}.x").write_text("half a registry")
    alive = parent / f".store.borahub-tmp.{os.getppid()}.zzz"  # a live writer's temp folder is left alone
    alive.mkdir()
    store.read_state(parent / "store")
    assert not (parent / f".store.borahub-tmp.{pid}.abc").exists() and alive.exists()
    from tasks.registry import add_tasks

    (parent / "new.yaml").write_text(yaml.safe_dump([{"name": "extra", "data": {"path": "sport.jsonl"}}]))
    add_tasks(tiny_hub, parent / "new.yaml")
    assert not (parent / f".tasks.yaml.borahub-tmp.{pid}.x").exists()


def test_resume_at_the_last_step_reports_the_trained_nll(tiny_registry):
    ws = Workspace(tiny_registry)
    first = ws.train(progress=False)
    again = Workspace(tiny_registry).train(resume=True, progress=False)
    assert again.start_step == again.steps and again.last_nll == pytest.approx(first.last_nll)
    assert store.read_state(tiny_registry.parent / "store")["metrics"]["train_nll"] == pytest.approx(first.last_nll)


def test_tasks_add_keeps_the_registry_mode_and_its_symlink(tiny_registry, tmp_path, capsys):
    real = tmp_path / "real-tasks.yaml"
    real.write_text(tiny_registry.read_text())
    os.chmod(real, 0o644)
    link = tiny_registry.parent / "linked.yaml"
    link.symlink_to(real)
    (tiny_registry.parent / "new.yaml").write_text(yaml.safe_dump([{"name": "extra", "data": {"path": "sport.jsonl"}}]))
    assert run_cli(["--config", str(link), "tasks", "add", str(tiny_registry.parent / "new.yaml")], capsys)[0] == 0
    assert link.is_symlink() and stat.S_IMODE(real.stat().st_mode) == 0o644
    assert "extra" in real.read_text()


def test_unwritable_registry_folder_is_one_line(tiny_registry, capsys, monkeypatch):
    """As root a read-only folder is still writable, so the refusal is simulated where the write starts."""
    import tempfile

    def refuse(*a, **kw):
        raise PermissionError(13, "Permission denied", kw.get("dir"))

    (tiny_registry.parent / "new.yaml").write_text(yaml.safe_dump([{"name": "extra", "data": {"path": "sport.jsonl"}}]))
    before = checksums(tiny_registry.parent)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, err = run_cli(["--config", str(tiny_registry), "tasks", "add", str(tiny_registry.parent / "new.yaml")],
                        capsys)
    assert_one_line_error(code, err, "cannot write (Permission denied); nothing was changed")
    assert checksums(tiny_registry.parent) == before


def test_unreadable_registry_is_one_line(tiny_registry, capsys, monkeypatch):
    real_read = Path.read_text

    def read_text(self, *a, **kw):
        if self.name == "tasks.yaml":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", read_text)
    code, err = run_cli(["--config", str(tiny_registry), "tasks", "validate"], capsys)
    assert_one_line_error(code, err, "cannot read (Permission denied)")


@pytest.mark.parametrize("argv,expected", [(["route", "stir", "--out", "."], "--out .: not a file"),
                                           (["export", "cooking", "--out", "tasks.yaml"], "is not a folder")])
def test_outputs_that_are_the_wrong_kind_of_path(tiny_hub, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(tiny_hub.parent)
    before = checksums(tiny_hub.parent)
    assert_one_line_error(*run_cli(["--config", str(tiny_hub), *argv], capsys), expected)
    assert checksums(tiny_hub.parent) == before


def test_generate_refuses_more_new_tokens_than_the_context(tiny_hub, capsys):
    code, err = run_cli(["--config", str(tiny_hub), "generate", "--task", "cooking", "--max-new-tokens", "100000",
                         "stir"], capsys)
    assert_one_line_error(code, err, "the model's context holds 256 tokens")
