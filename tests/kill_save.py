"""Driver for test_store_safety's kill test (not collected by pytest): kill a store save with SIGKILL
before each of its file-system operations in turn, and report what the store path holds afterwards.

    python tests/kill_save.py MODEL_DIR WORK_DIR exchange|rename   ->  JSON list on stdout, one row per kill
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import tasks.atomic as atomic  # noqa: E402
from hub import store  # noqa: E402
from hub.store_check import parse_state, verify_files  # noqa: E402
from models.base import load_base  # noqa: E402
from models.multitask import MultiTaskModel  # noqa: E402
from tasks.schema import AdapterSpec  # noqa: E402

OPS = [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "rmdir"), (os, "mkdir"), (shutil, "rmtree"),
       (atomic, "_exchange"), (store, "save_file"), (pathlib.Path, "write_text"), (tempfile, "mkdtemp")]


def kill_at(n: int) -> None:
    """Wrap every operation of OPS: the n-th call (counting all of them) kills the process first."""
    count = [0]
    for owner, name in OPS:
        original = getattr(owner, name)

        def wrapped(*a, _original=original, _name=name, **kw):
            count[0] += 1
            if count[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return _original(*a, **kw)

        setattr(owner, name, wrapped)


def version_at(path: pathlib.Path) -> str | None:
    """Which save the store path holds, read without any recovery ('old'/'new'), or None if not loadable."""
    try:
        state = parse_state((path / "hub.json").read_bytes(), "hub.json")
        verify_files(path, state, "hub.json")
    except (OSError, store.StoreError):
        return None
    return state["metrics"]["v"]


def main() -> None:
    model_dir, work, mode = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    lm, tok = load_base(model_dir)
    spec = AdapterSpec(rank=2, alpha=4, target_modules=["q_proj", "v_proj"])
    mtm = MultiTaskModel(lm, tok, model_dir, [("a", spec), ("b", spec)])
    specs, info = {"a": spec, "b": spec}, {}
    pristine, target = work / "pristine", work / "project" / "store"
    mtm.set_params(mtm.init_params(0))
    store.save(pristine, mtm, 1.0, info, specs, metrics={"v": "old"})
    mtm.set_params(mtm.init_params(1))
    if mode == "rename":
        atomic._exchange = lambda a, b: False
    rows = []
    for n in range(1, 500):
        shutil.rmtree(target.parent, ignore_errors=True)
        target.parent.mkdir(parents=True)
        shutil.copytree(pristine, target)
        pid = os.fork()
        if pid == 0:
            kill_at(n)
            store.save(target, mtm, 1.0, info, specs, metrics={"v": "new"})
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status)
        now = version_at(target)
        after = store.read_state(target)["metrics"]["v"]  # a later command: recovers and cleans up
        leftovers = sorted(p.name for p in target.parent.iterdir() if p.name != "store")
        rows.append({"n": n, "killed": killed, "at_kill": now, "after": after, "leftovers": leftovers})
        if not killed:
            break
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
