"""bench/gpu_check.py runs end to end (--smoke: a tiny model on this machine's device), so the GPU check is
ready when a GPU is lent; its forward part compares the same adapters in ours and in PEFT."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_writes_its_results(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    (r,) = res["models"].values()
    assert set(r["train"]["median_s"]) == {"ours_joint", "peft_single", "peft_loop"}
    assert [row["adapters"] for row in r["forward"]["table"]] == [1, 8, 64]
    assert r["forward"]["ours_vs_peft_rel_logit_diff"] < 0.05  # the same adapters (bf16 rounding apart)
    assert r["bf16"]["bf16_tokens_per_s"] > 0
    assert json.loads((tmp_path / "mixed_batch_gpu.json").read_text())["models"]
    assert "joint / PEFT loop" in (tmp_path / "gpu_check.md").read_text()
