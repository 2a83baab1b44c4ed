"""Serving under load, with the real `openai` client: `borahub serve` (every request routed with `auto`) against
`transformers serve --continuous-batching` on the bare base model (the peer), one run, same prompts.

For each number of concurrent clients (default 1, 4, 16) and each server (started alone for that level, the two
servers back to back, alternating which goes first), every client sends ``--rounds``
chat requests one after another (greedy, ``--tokens`` new tokens each); reported: completion tokens per second
over the whole level (sum of usage.completion_tokens / wall time), p50/p95 request latency, errors, and for ours
the adapters that served the requests. Prompts: the openings of unseen BBC News test articles (the demo hub's
topics), as a user would send them. Each server runs alone, as a subprocess with ``--threads`` torch threads.
Prints JSON; writes docs/results/serve.{json,md}.

Both servers run in ``--precision`` (fp32, or bf16: our ``--precision bf16``, the peer's ``--dtype bfloat16``).
``--repeats N`` measures every level N times (the whole sweep again, who goes first alternating) and reports each
level's medians, every run kept under ``runs``: on a shared 2-core machine one level's throughput moved by up to
35% between runs minutes apart, for both servers.

    python bench/serve.py [--config tasks.yaml] [--clients 1,4,16] [--tokens 32] [--rounds 2] [--precision fp32]
                          [--repeats 1] [--no-peer]
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(config: Path, n: int) -> list[str]:
    """Openings (~40 words) of the demo hub's unseen test articles, tasks interleaved."""
    from hub.workspace import Workspace

    ws = Workspace(config)
    per_task = [[e.router_text for e in ws.data(name).test] for name in ws.cfg.task_names]
    out = []
    for i in range(max(map(len, per_task))):
        out += [" ".join(docs[i].split()[:40]) for docs in per_task if i < len(docs)]
    return out[:n]


def cpu_name() -> str:
    """The CPU model and whether it multiplies bf16 natively (AMX tiles): bf16 results depend on it."""
    import torch

    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return f"{name}, AMX bf16: {'yes' if torch.cpu._is_amx_tile_supported() else 'no'}"


def start(cmd: list[str], port: int, threads: int, log: Path) -> subprocess.Popen:
    import httpx2 as httpx

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not answer /health in 600 s")


def load(url: str, model: str, texts: list[str], clients: int, rounds: int, tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=1800)

    def one(i: int):
        t = time.perf_counter()
        try:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": texts[i]}],
                                               max_tokens=tokens, temperature=0)
        except openai.OpenAIError as e:
            return time.perf_counter() - t, 0, f"{type(e).__name__}: {e}"[:200], None
        return time.perf_counter() - t, r.usage.completion_tokens, None, r.model

    def client_loop(c: int):
        return [one((c * rounds + k) % len(texts)) for k in range(rounds)]

    one(0)  # warm-up (the peer loads its model on first use)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client_loop, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    done = sum(r[1] for r in results)
    return {"clients": clients, "requests": len(results), "completion_tokens": done, "wall_s": round(wall, 2),
            "tokens_per_s": round(done / wall, 2), "p50_s": round(statistics.median(lat), 2),
            "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 2),
            "errors": [r[2] for r in results if r[2]][:3], "error_count": sum(1 for r in results if r[2]),
            "served_by": dict(collections.Counter(r[3] for r in results if r[3]))}


def median_level(results: list[dict]) -> dict:
    """One level's result: the run itself, or with several runs the medians of its figures and every run."""
    if len(results) == 1:
        return results[0]
    med = {k: round(statistics.median(r[k] for r in results), 2) for k in ("tokens_per_s", "p50_s", "p95_s")}
    return {**results[0], **med, "error_count": sum(r["error_count"] for r in results),
            "served_by": results[0]["served_by"], "runs": results}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "tasks.yaml"))
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=1, help="measure every level this many times; report medians")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "serve"))
    args = ap.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    texts = prompts(Path(args.config), max(levels) * args.rounds)
    logs = Path(tempfile.mkdtemp(prefix="borahub-serve-bench-"))  # the servers' own output, for a failed start
    ours_name, peer_name = "borahub serve (auto routing)", "transformers serve --continuous-batching (base model)"
    servers: dict[str, list] = {ours_name: []} if args.no_peer else {ours_name: [], peer_name: []}

    def measure(name: str, clients: int) -> dict:
        """Start the server alone, load it with ``clients`` clients, stop it."""
        port = free_port()
        if name == ours_name:
            cmd, model = [sys.executable, "-m", "hub.cli", "--config", args.config, "--precision", args.precision,
                          "serve", "--port", str(port),
                          "--max-batch", str(max(levels))], "auto"
        else:
            from models.base import _embedded_folder

            model = str(_embedded_folder("smollm2-135m"))
            cmd = [str(Path(sys.executable).parent / "transformers"), "serve", model, "--continuous-batching",
                   "--device", "cpu", "--port", str(port),
                   "--dtype", {"fp32": "float32", "bf16": "bfloat16"}[args.precision]]
        proc = start(cmd, port, args.threads, logs / f"{'ours' if name == ours_name else 'peer'}_{clients}.log")
        try:
            result = load(f"http://127.0.0.1:{port}/v1", model, texts, clients, args.rounds, args.tokens)
            if name == ours_name:  # where the worker's time went (the warm-up request included)
                import httpx2 as httpx

                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()
                result["worker_busy_s"], result["steps"] = health.get("busy_s"), health.get("steps")
                result["prefills"] = health.get("prefills")
            return result
        finally:
            proc.terminate()
            proc.wait(60)

    # level by level, the two servers one after the other (alternating who goes first), so that the machine's
    # drift over the run (measured: up to 35% between runs minutes apart) falls on both sides of each ratio
    runs: dict[str, list[list[dict]]] = {name: [[] for _ in levels] for name in servers}
    for rep in range(max(1, args.repeats)):
        for i, clients in enumerate(levels):
            for name in (list(servers) if (i + rep) % 2 == 0 else list(servers)[::-1]):
                runs[name][i].append(measure(name, clients))
                print(json.dumps({name: runs[name][i][-1]}), flush=True)
    for name in servers:
        servers[name] = [median_level(level) for level in runs[name]]

    ours = servers[ours_name]
    summary = {"ours_16_over_1": round(ours[-1]["tokens_per_s"] / ours[0]["tokens_per_s"], 2)}
    peer = servers.get(peer_name)
    if peer:
        summary["ours_over_peer_at_max_clients"] = round(ours[-1]["tokens_per_s"] / peer[-1]["tokens_per_s"], 2)
        summary["p95_ours_vs_peer_at_max_clients"] = [ours[-1]["p95_s"], peer[-1]["p95_s"]]
    command = "python bench/serve.py " + " ".join(sys.argv[1:])
    result = {"command": command.strip(), "date": dt.date.today().isoformat(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "cpu": cpu_name(), "precision": args.precision, "threads": args.threads,
              "tokens": args.tokens, "rounds": args.rounds, "repeats": max(1, args.repeats),
              "servers": servers, "summary": summary}
    print(json.dumps(result, indent=2))
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Serving under load: `borahub serve` vs `transformers serve --continuous-batching`", "",
             f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}, {result['cpu']}, {result['cpus']} CPU cores, {args.threads} torch threads "
             f"per server, both servers in {args.precision}; {result['date']}. Greedy, {args.tokens} new tokens, "
             f"{args.rounds} requests per client in a row; prompts: openings of unseen BBC test articles."
             + (f" Each level measured {result['repeats']} times: medians, each run's tok/s in brackets."
                if result["repeats"] > 1 else ""), "",
             "| server | clients | completion tok/s | p50 s | p95 s | errors | served by |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name, rows in servers.items():
        for r in rows:
            by = ", ".join(f"{k} {v}" for k, v in sorted(r["served_by"].items())) if "borahub" in name else "base"
            each = f" [{', '.join(str(x['tokens_per_s']) for x in r['runs'])}]" if "runs" in r else ""
            lines.append(f"| {name} | {r['clients']} | {r['tokens_per_s']}{each} | {r['p50_s']} | {r['p95_s']} | "
                         f"{r['error_count']} | {by} |")
    lines += ["", f"Summary: {json.dumps(summary)}"]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
