"""Training, the store, resume after a kill, PEFT loading, eval; one run on the embedded SmolLM2."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hub import store
from hub.cli import main
from hub.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]


def native(store_dir: Path) -> dict[str, torch.Tensor]:
    out = {"global": load_file(str(store_dir / "global.safetensors"))}
    for d in sorted(store_dir.iterdir()):
        if (d / "native.safetensors").is_file():
            out[d.name] = load_file(str(d / "native.safetensors"))
    return out


def test_stored_task_loads_in_plain_peft_with_our_logits(tiny_hub):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ws = Workspace(tiny_hub)
    mtm, state = ws.trained_model()
    assert state["fingerprint"] == mtm.fingerprint
    ids = torch.randint(4, 60, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for name in mtm.task_names:
        base = AutoModelForCausalLM.from_pretrained(ws.cfg.base_model, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, str(ws.store / name)).eval()
        with torch.no_grad():
            theirs = peft(input_ids=ids, attention_mask=mask).logits
            ours = mtm(ids, mask, torch.full((3,), mtm.task_id(name))).logits
            plain = mtm(ids, mask, None).logits
        assert (ours - theirs).abs().max() < 1e-5
        assert (ours - plain).abs().max() > 1e-5  # training moved the adapter away from zero


def test_eval_json_and_table(tiny_hub, capsys):
    assert main(["--config", str(tiny_hub), "eval", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"cooking", "finance", "sport"}
    assert all(r["perplexity"] > 1 and r["docs"] >= 1 for r in res.values())
    assert main(["--config", str(tiny_hub), "eval"]) == 0
    assert "mean" in capsys.readouterr().out


def test_store_refuses_another_base_model(tiny_hub, capsys):
    hub_json = tiny_hub.parent / "store" / "hub.json"
    state = json.loads(hub_json.read_text())
    state["fingerprint"]["config_hash"] = "0" * 16
    hub_json.write_text(json.dumps(state))
    assert main(["--config", str(tiny_hub), "eval"]) == 2
    err = capsys.readouterr().err
    assert "trained for base model" in err and len(err.strip().splitlines()) == 1


def test_store_refuses_wrong_shapes_and_corrupt_files(tiny_hub):
    ws = Workspace(tiny_hub)
    path = ws.store / "finance" / "native.safetensors"
    tensors = load_file(str(path))
    key = next(iter(tensors))
    from safetensors.torch import save_file

    save_file({**tensors, key: torch.zeros(3, 3)}, str(path))
    with pytest.raises(store.StoreError, match="finance/native.safetensors: changed since it was saved"):
        ws.trained_model()  # the file list in hub.json catches it first
    state = store.read_state(ws.store, verify=False)
    mtm = store.build(state, *ws.base())
    with pytest.raises(store.StoreError, match="has shape"):  # the shape check behind it
        store.load_into(mtm, ws.store, state)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(store.StoreError, match="corrupt"):
        store.load_into(mtm, ws.store, state)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_schedule_sets_each_step_rate_from_the_step_alone(schedule):
    import math

    from conftest import tiny_batcher, tiny_lm, tiny_tokenizer

    from models.bora import BoraPrior
    from models.multitask import MultiTaskModel
    from models.trainer import Trainer
    from tasks.schema import AdapterSpec

    spec = AdapterSpec(rank=4, alpha=8, target_modules=["q_proj"])
    mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("a", spec), ("b", spec)])
    prior = BoraPrior(mtm, 10.0, torch.full((2,), 6.0), mtm.init_params(0))
    t = Trainer(prior, tiny_batcher(2), steps=4, lr=0.01, seed=0, lr_schedule=schedule)
    rates = []
    for _ in range(4):
        t.train_step()
        rates.append(t.optimizer.param_groups[0]["lr"])
    factor = [0.5 * (1 + math.cos(math.pi * s / 4)) if schedule == "cosine" else 1.0 for s in range(4)]
    assert rates == [0.01 * f for f in factor]


def test_max_grad_norm_clips_the_step_gradient_and_counts_clipped_steps(tiny_registry, capsys):
    from conftest import tiny_batcher, tiny_lm, tiny_tokenizer

    from models.bora import BoraPrior
    from models.multitask import MultiTaskModel
    from models.trainer import Trainer
    from tasks.schema import AdapterSpec

    def trainer(bound):
        torch.manual_seed(0)
        spec = AdapterSpec(rank=4, alpha=8, target_modules=["q_proj"])
        mtm = MultiTaskModel(tiny_lm(), tiny_tokenizer(), "tiny", [("a", spec), ("b", spec)])
        prior = BoraPrior(mtm, 10.0, torch.full((2,), 6.0), mtm.init_params(0))
        return Trainer(prior, tiny_batcher(2), steps=2, lr=0.01, seed=0, max_grad_norm=bound)

    def grad_norm(t):
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for _, p in t.named_params])))

    free = trainer(None)
    free.train_step()
    raw = grad_norm(free)
    clipped = trainer(raw / 4)
    clipped.train_step()
    assert grad_norm(clipped) == pytest.approx(raw / 4, rel=1e-4) and clipped.clipped_steps == 1
    assert clipped.last_grad_norm == pytest.approx(raw, rel=1e-5)
    loose = trainer(raw * 4)
    loose.train_step()
    assert grad_norm(loose) == pytest.approx(raw, rel=1e-6) and loose.clipped_steps == 0
    # from the registry: every step's gradient is far above a tiny bound
    cfg = yaml.safe_load(tiny_registry.read_text())
    cfg["training"]["max_grad_norm"] = 1e-6
    tiny_registry.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tiny_registry), "train", "--quiet", "--steps", "3"]) == 0
    assert "3 steps clipped to max_grad_norm" in capsys.readouterr().out


def test_on_step_sees_every_step_of_a_workspace_run(tiny_registry):
    from hub.workspace import Workspace

    seen = []
    report = Workspace(tiny_registry).train(steps=3, progress=False, fit_router=False,
                                            on_step=lambda t, nll, s: seen.append((t.step, nll, s, t.steps)))
    assert [x[0] for x in seen] == [1, 2, 3] and all(x[3] == 3 and x[2] > 0 for x in seen)
    assert seen[-1][1] == report.last_nll and all(math.isfinite(x[1]) for x in seen)

def cli(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "hub.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_training_resumes_to_the_same_adapters(tmp_path, tiny_model_dir):
    from conftest import write_tiny_registry

    runs = {}
    for name in ("straight", "killed"):
        d = tmp_path / name
        d.mkdir()
        write_tiny_registry(d, tiny_model_dir, training={"steps": 150, "batch_size": 6, "max_length": 16,
                                                         "lr": 0.01, "checkpoint_every": 5, "seed": 3})
        runs[name] = d
    straight = cli("train", "--quiet", cwd=runs["straight"])
    killed = cli("train", "--quiet", cwd=runs["killed"])
    ckpt = store.checkpoint_dir(runs["killed"] / "store") / "checkpoint.safetensors"
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and killed.poll() is None:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (runs["killed"] / "store" / "hub.json").exists()
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        assert 0 < int(f.metadata()["step"]) < 150
    assert straight.wait() == 0, straight.stderr.read()
    resumed = cli("train", "--quiet", "--resume", cwd=runs["killed"])
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    assert "from step 0" not in out
    a, b = native(runs["straight"] / "store"), native(runs["killed"] / "store")
    assert a.keys() == b.keys()
    for part in a:
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


def test_resume_refuses_a_checkpoint_of_another_run(tiny_registry, capsys):
    assert main(["--config", str(tiny_registry), "train", "--quiet", "--steps", "2"]) == 0
    assert main(["--config", str(tiny_registry), "train", "--quiet", "--steps", "2", "--tau", "5", "--resume"]) == 2
    assert "different run" in capsys.readouterr().err


def test_embedded_smollm2_trains_and_evaluates(tmp_path):
    """Integration: the default registry on the embedded model, two steps, tiny eval."""
    cfg = yaml.safe_load((REPO / "tasks.yaml").read_text())
    cfg["tasks"] = cfg["tasks"][:2]
    for t in cfg["tasks"]:  # small splits: the router is fitted on the train + validation inputs
        t["data"].update(max_train=8, validation=0.02)
    cfg["training"].update(batch_size=2, max_length=24, eval_docs=2, checkpoint_every=1)
    (tmp_path / "tasks.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(tmp_path / "tasks.yaml"), "train", "--steps", "2", "--quiet"]) == 0
    state = json.loads((tmp_path / ".borahub" / "store" / "hub.json").read_text())
    assert state["base_model"] == "smollm2-135m" and len(state["tasks"]) == 2
    cfg_peft = json.loads((tmp_path / ".borahub" / "store" / "business" / "adapter_config.json").read_text())
    assert cfg_peft["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg_peft["r"] == 8
    res = Workspace(tmp_path / "tasks.yaml").evaluate()
    assert all(1 < r["perplexity"] < 1000 for r in res.values())
    shutil.rmtree(tmp_path / ".borahub")
