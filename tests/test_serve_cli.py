"""`borahub serve` as users start it: a subprocess, the scheduler's loop on the main thread, a clean stop."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import openai
from conftest import free_port

ROOT = Path(__file__).resolve().parents[1]


def _start(config: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "hub.cli", "--config", str(config), "serve", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_decodes_on_the_main_thread_and_stops_cleanly(tiny_hub):
    port = free_port()
    proc = _start(tiny_hub, port)
    try:
        deadline, health = time.monotonic() + 120, None
        while health is None:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "borahub serve did not answer /health"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            except httpx.HTTPError:
                time.sleep(0.2)
        # the thread that loaded the model runs the steps (hub/scheduler.py: OpenMP spins only for one team)
        assert health["worker"] == "MainThread"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        r = client.completions.create(model="cooking", prompt="stir the soup", max_tokens=4, temperature=0)
        assert r.model == "cooking" and r.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_on_a_taken_port_says_so_in_one_line(tiny_hub):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = _start(tiny_hub, taken.getsockname()[1])
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    last = err.strip().splitlines()[-1]
    assert "could not listen on 127.0.0.1:" in last and "Traceback" not in err
