"""bench/serve.py's report of a level measured several times: medians, every run kept."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from serve import median_level  # noqa: E402


def run(tps: float, p95: float, errors: int = 0) -> dict:
    return {"clients": 16, "tokens_per_s": tps, "p50_s": p95 / 2, "p95_s": p95, "error_count": errors,
            "served_by": {"business": 32}}


def test_one_run_is_reported_as_it_is():
    assert median_level([run(50.0, 9.0)]) == run(50.0, 9.0)


def test_several_runs_give_medians_and_keep_every_run():
    runs = [run(50.0, 9.0), run(80.0, 6.0, errors=1), run(60.0, 12.0)]
    level = median_level(runs)
    assert (level["tokens_per_s"], level["p95_s"], level["p50_s"]) == (60.0, 9.0, 4.5)
    assert level["error_count"] == 1 and level["runs"] == runs and level["clients"] == 16
