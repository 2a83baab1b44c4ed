"""models/allocator.py: with freed memory retained, a repeated large allocation faults in no new page."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import resource, sys, torch
from models.allocator import retain_freed_memory
applied = retain_freed_memory()
faulting = 0
for _ in range(12):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)  # 64 MB, written
    del t
    faulting += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0 > 0
print(applied, faulting)
"""
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")


def probe(env_extra: dict[str, str]) -> tuple[bool, int]:
    """(applied, how many of 12 successive 64 MB allocations faulted in fresh pages) in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "BORAHUB_SYSTEM_MALLOC"} | env_extra
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    applied, faulting = out.stdout.split()
    return applied == "True", int(faulting)


@linux_only
def test_retained_memory_is_reused_without_page_faults():
    applied, retained = probe({})
    assert applied
    default_applied, default = probe({"BORAHUB_SYSTEM_MALLOC": "1"})
    assert not default_applied
    # glibc's default maps every 64 MB block afresh, so each allocation faults; retained, the heap grows over the
    # first two to four (where glibc's aligned block lands varies run to run) and every later one reuses it
    assert default == 12
    assert retained <= 6, retained


@linux_only
def test_cli_retains_freed_memory(tmp_path, monkeypatch):
    import models.allocator as allocator
    from hub.cli import main

    monkeypatch.delenv("BORAHUB_SYSTEM_MALLOC", raising=False)
    monkeypatch.setattr(allocator, "applied", False)
    assert main(["--config", str(tmp_path / "missing.yaml"), "tasks", "validate"]) == 2
    assert allocator.applied


def test_serve_is_a_long_lived_service_and_keeps_the_system_allocator():
    from hub.cli import build_parser, one_job

    parser = build_parser()
    assert not one_job(parser.parse_args(["serve"]))
    assert all(one_job(parser.parse_args(argv)) for argv in (["train"], ["eval"], ["tasks", "validate"]))
