"""Data-parallel training through `accelerate launch` (2 CPU processes, gloo): the same adapters as one process
on the same global batch, hub.json's run record, and a 2-process run killed after a checkpoint resumed by one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, write_tiny_registry
from test_train import native

from hub import store
from hub.cli import main

REPO = Path(__file__).resolve().parents[1]
TRAINING = {"steps": 8, "batch_size": 6, "grad_accum": 2, "max_length": 16, "lr": 0.01, "checkpoint_every": 3,
            "eval_docs": 4, "seed": 5, "device": "cpu"}


def launch(script: list[str], *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`accelerate launch` with 2 processes on the CPU (the launcher's --multi_gpu runs gloo where no GPU is)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), *script, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def run_record(project: Path) -> dict:
    return json.loads((project / "store" / "hub.json").read_text())["metrics"]["run"]


def assert_same_adapters(a: Path, b: Path) -> None:
    x, y = native(a / "store"), native(b / "store")
    assert x.keys() == y.keys()
    for part in x:
        for k in x[part]:
            assert torch.allclose(x[part][k], y[part][k], rtol=1e-4, atol=1e-6), (part, k)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir) -> Path:
    d = tmp_path_factory.mktemp("one")
    write_tiny_registry(d, tiny_model_dir, training=TRAINING)
    assert main(["--config", str(d / "tasks.yaml"), "train", "--quiet"]) == 0
    return d


def test_two_processes_train_the_adapters_one_process_trains(one_process, tmp_path, tiny_model_dir):
    write_tiny_registry(tmp_path, tiny_model_dir, training=TRAINING)
    done = launch(["-m", "hub.cli"], "train", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_adapters(one_process, tmp_path)
    rows = TRAINING["batch_size"] * TRAINING["grad_accum"] * TRAINING["steps"]
    two, one = run_record(tmp_path), run_record(one_process)
    # measured rows: two processes that each trained the whole batch would show [rows, rows]
    assert two["processes"] == 2 and two["rows_per_process"] == [rows // 2, rows // 2]
    assert one["processes"] == 1 and one["rows_per_process"] == [rows]
    for r in (one, two):
        assert (r["global_batch"], r["device"], r["precision"]) == (6, "cpu", "fp32")
    assert not list(store.checkpoint_dir(tmp_path / "store").glob("*.tmp*"))


def test_a_killed_two_process_run_resumes_in_one_process(one_process, tmp_path, tiny_model_dir):
    write_tiny_registry(tmp_path, tiny_model_dir, training=TRAINING)
    killed = launch([str(REPO / "tests" / "kill_train.py"), "3"], "train", "--quiet", cwd=tmp_path)
    assert killed.returncode != 0, "the run finished although its main process was to be killed"
    assert not (tmp_path / "store" / "hub.json").exists()
    from safetensors import safe_open

    with safe_open(str(store.checkpoint_dir(tmp_path / "store") / "checkpoint.safetensors"), "pt") as f:
        assert int(f.metadata()["step"]) == 3
    assert main(["--config", str(tmp_path / "tasks.yaml"), "train", "--quiet", "--resume"]) == 0
    assert_same_adapters(one_process, tmp_path)
    assert run_record(tmp_path)["steps_run"] == TRAINING["steps"] - 3


def test_what_one_process_must_do_alone_is_refused_with_one_line(tmp_path, tiny_model_dir):
    write_tiny_registry(tmp_path, tiny_model_dir, training={**TRAINING, "batch_size": 1, "grad_accum": 1})
    done = launch(["-m", "hub.cli"], "train", "--quiet", cwd=tmp_path)
    assert done.returncode != 0  # the launcher's own code; each process exited 2 with the one line below
    assert "training.batch_size: 1 is less than the number of processes (2)" in done.stderr
    auto = launch(["-m", "hub.cli"], "train", "--quiet", "--tau", "search", cwd=tmp_path)
    assert auto.returncode != 0 and "prior.tau: 'search' trains and evaluates several runs" in auto.stderr
    done.stderr += auto.stderr
    for ours in ("hub", "models", "tasks"):  # no traceback through our code
        assert f'File "{REPO / ours}' not in done.stderr
