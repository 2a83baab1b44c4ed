"""bf16 on the CPU end to end (train, eval, export, PEFT load), and device / precision choices and their errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import write_tiny_registry

from hub.cli import main
from hub.workspace import Workspace
from models import device as device_mod

TRAINING = {"steps": 6, "batch_size": 6, "max_length": 16, "lr": 0.01, "checkpoint_every": 3, "eval_docs": 4,
            "seed": 1, "device": "cpu", "precision": "bf16"}


def test_bf16_trains_evaluates_exports_and_loads_in_peft(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = write_tiny_registry(tmp_path, tiny_model_dir, training=TRAINING)
    assert main(["--config", str(config), "train", "--quiet"]) == 0
    state = json.loads((tmp_path / "store" / "hub.json").read_text())
    assert state["metrics"]["run"]["precision"] == "bf16"
    capsys.readouterr()
    assert main(["--config", str(config), "eval", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert all(1 < r["perplexity"] < 1e4 for r in res.values())
    assert main(["--config", str(config), "export", "sport", "--out", str(tmp_path / "peft")]) == 0
    capsys.readouterr()
    assert main(["--config", str(config), "generate", "a match", "--max-new-tokens", "4"]) == 0  # routed, bf16
    assert capsys.readouterr().out.strip()

    ws = Workspace(config)
    mtm, _ = ws.trained_model()
    assert next(mtm.lm.parameters()).dtype == torch.bfloat16  # the frozen base runs in bf16
    assert all(g.flat.dtype == torch.float32 for g in mtm.groups)  # the adapters keep float32 values
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(tmp_path / "peft")).eval()
    lora = {k: v for k, v in peft.state_dict().items() if "lora_" in k}
    assert lora and all(v.dtype == torch.float32 for v in lora.values())
    ids = torch.randint(4, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        theirs = peft(input_ids=ids, attention_mask=mask).logits
        ours = mtm(ids, mask, torch.full((2,), mtm.task_id("sport"))).logits.float()  # bf16 inference path
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()  # bf16 rounding, not a different adapter
    monkeypatch.setenv("BORAHUB_PRECISION", "fp32")  # the same store served in float32 equals PEFT's logits
    mtm32, _ = Workspace(config).trained_model()
    with torch.no_grad():
        ours32 = mtm32(ids, mask, torch.full((2,), mtm32.task_id("sport"))).logits
    assert (ours32 - theirs).abs().max() < 1e-5


def test_device_and_precision_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert device_mod.resolve_device("cpu") == cpu
    assert device_mod.resolve_precision("auto", cpu) == "fp32"
    assert device_mod.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(device_mod.DeviceError, match="fp16 needs a GPU"):
        device_mod.resolve_precision("fp16", cpu)
    if not torch.cuda.is_available():
        assert device_mod.resolve_device("auto") == cpu or device_mod._mps()
        with pytest.raises(device_mod.DeviceError, match="no CUDA device"):
            device_mod.resolve_device("cuda")
    monkeypatch.setenv("BORAHUB_DEVICE", "tpu")
    with pytest.raises(device_mod.DeviceError, match="BORAHUB_DEVICE='tpu'"):
        device_mod.setting("device", "auto")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where no CUDA device exists")
def test_cli_device_errors_are_one_line(tiny_registry, capsys):
    assert main(["--config", str(tiny_registry), "--device", "cuda", "train", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["borahub: error: training.device: cuda was asked for but no CUDA device is available here"]
    assert main(["--config", str(tiny_registry), "train", "--precision", "fp16", "--quiet"]) == 2
    assert "fp16 needs a GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad:
        main(["--config", str(tiny_registry), "train", "--device", "gpu"])
    assert bad.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert "BORAHUB_DEVICE" not in os.environ and "BORAHUB_PRECISION" not in os.environ  # main() put them back
