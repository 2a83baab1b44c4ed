"""The local store: one folder per task in PEFT's LoRA layout, plus the hub state at the root.

    <store>/hub.json                      marker, base model + fingerprint, tau, groups, tasks, metrics, and
                                          the size + SHA-256 of every file below (hub/store_check.py)
    <store>/global.safetensors            Theta of every group (native parameters)
    <store>/<task>/adapter_config.json    PEFT LoRA config       } loads with PeftModel.from_pretrained
    <store>/<task>/adapter_model.safetensors                      }
    <store>/<task>/native.safetensors     the task's native parameters (to continue training)
    <store>/router.json, router.safetensors   the router (hub/router.py), written after the save

A save builds the whole store in a temporary folder and swaps it in atomically (tasks/atomic.py), so the
store path always holds a whole store, the old or the new one. It replaces only an empty folder or a store
(never a folder of the user's), and refuses non-finite weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.base import base_mismatch, hub_id, load_base
from models.multitask import MultiTaskModel
from models.stacked import GLOBAL, Group
from models.targets import ALL_LINEAR, leaf_names
from tasks.atomic import atomic_write_text, recover, write_dir
from tasks.schema import AdapterSpec

from .store_check import FORMAT, HUB_FILE, MARKER, StoreError, check_target, file_record, parse_state, verify_files

GLOBAL_FILE, NATIVE_FILE = "global.safetensors", "native.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
__all__ = ["StoreError", "HUB_FILE", "GLOBAL_FILE", "NATIVE_FILE", "PEFT_CONFIG", "PEFT_WEIGHTS", "save", "load",
           "read_state", "add_metrics", "load_into", "read_params", "build", "write_peft", "peft_tensors",
           "check_fingerprint", "checkpoint_dir"]


def checkpoint_dir(store: str | Path) -> Path:
    store = Path(store)
    return store.parent / f"{store.name}-checkpoint"


def _native(g: Group, row: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{m}:{p}": row[s.offset: s.offset + s.numel].view(s.shape).contiguous() for m, p, s in g.slices()}


def _flat(g: Group, tensors: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    parts = []
    for m, p, s in g.slices():
        t = tensors.get(f"{m}:{p}")
        if t is None:
            raise StoreError(f"{where}: missing tensor {m}:{p}")
        if tuple(t.shape) != s.shape:
            raise StoreError(f"{where}: tensor {m}:{p} has shape {tuple(t.shape)}, the model needs {s.shape}")
        parts.append(t.reshape(-1).float())
    return torch.cat(parts)


def peft_tensors(mtm: MultiTaskModel, task_id: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A task's adapter (or, for GLOBAL, the primary group's Theta) as PEFT LoRA weights and config (every
    adapter type exports to LoRA)."""
    g, slot = (mtm.groups[0], mtm.groups[0].theta_slot) if task_id == GLOBAL else mtm.locate(task_id)
    tensors, ranks, alphas = {}, {}, {}
    for m in g.layout:
        p = {k: v[slot].detach() for k, v in g.params(m).items()}
        A, B, alpha = g.atype.to_lora(p, g.frozen[m], g.spec)
        tensors[f"base_model.model.{m}.lora_A.weight"] = A.float().contiguous()
        tensors[f"base_model.model.{m}.lora_B.weight"] = B.float().contiguous()
        ranks[m], alphas[m] = A.shape[0], alpha
    # all-linear: the modules it found, by name (explicit, so the export means the same to any PEFT version)
    targets = leaf_names(g.layout) if ALL_LINEAR in g.targets else sorted(g.targets)
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": hub_id(mtm.base_name),
        "r": r, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": g.fan_in_fan_out, "inference_mode": True, "use_rslora": False,
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
    }
    return tensors, config


def write_peft(mtm: MultiTaskModel, task_id: int, out: Path) -> None:
    tensors, config = peft_tensors(mtm, task_id)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2))


def check_finite(mtm: MultiTaskModel) -> None:
    """Refuse to store NaN or inf weights (a diverged run must not replace a good store)."""
    for g in mtm.groups:
        if not bool(torch.isfinite(g.flat).all()):
            raise StoreError(f"adapter group {g.key}: weights are NaN or inf (training diverged); "
                             "the stored hub was left as it was: lower training.lr")


def save(store: str | Path, mtm: MultiTaskModel, tau, task_info: dict[str, dict], specs: dict[str, AdapterSpec],
         metrics: dict | None = None) -> None:
    """Write the whole store (every task of ``mtm``) atomically; only over nothing, an empty folder or a store."""
    store = Path(store)
    check_finite(mtm)
    recover(store)
    check_target(store)

    def build(tmp: Path) -> None:
        theta_global = {}
        for gi, g in enumerate(mtm.groups):
            theta_global.update({f"{gi}/{k}": v for k, v in _native(g, g.flat[-1].detach().cpu()).items()})
        save_file(theta_global, str(tmp / GLOBAL_FILE))
        for tid, name in enumerate(mtm.task_names):
            g, slot = mtm.locate(tid)
            write_peft(mtm, tid, tmp / name)
            save_file(_native(g, g.flat[slot].detach().cpu()), str(tmp / name / NATIVE_FILE))
        state = {
            **MARKER, "format": FORMAT, "base_model": mtm.base_name, "fingerprint": mtm.fingerprint, "tau": tau,
            "groups": [{"key": g.key, "spec": g.spec.model_dump(), "tasks": [mtm.task_names[i] for i in g.task_ids],
                        "dim": g.dim} for g in mtm.groups],
            "tasks": [{"name": n, "group": mtm.locate(i)[0].key, "adapter": specs[n].model_dump(),
                       **task_info.get(n, {})}
                      for i, n in enumerate(mtm.task_names)],
            "metrics": metrics or {},
            "files": file_record(tmp),
        }
        (tmp / HUB_FILE).write_text(json.dumps(state, indent=2))

    write_dir(store, build)


def read_state(store: str | Path, verify: bool = True) -> dict:
    """The store's hub.json, checked (shape, names, and with ``verify`` every file's size and SHA-256)."""
    store = Path(store)
    recover(store)
    path = store / HUB_FILE
    if not path.is_file():
        raise StoreError(f"{store}: no trained hub here (missing {HUB_FILE}); run `borahub train` first")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise StoreError(f"{path}: cannot read ({e.strerror or e})") from None
    state = parse_state(raw, str(path))
    if verify:
        verify_files(store, state, str(path))
    return state


def add_metrics(store: str | Path, **metrics) -> None:
    """Add entries to hub.json's metrics (its file list is unchanged: hub.json is not in it)."""
    state = read_state(store)
    state["metrics"].update(metrics)
    atomic_write_text(Path(store) / HUB_FILE, json.dumps(state, indent=2))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise StoreError(f"{path}: missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise StoreError(f"{path}: corrupt safetensors file ({e})") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise StoreError(f"{path}: tensor {bad[0]} holds NaN or inf")
    return tensors


def check_fingerprint(expected: dict, actual: dict, where: str) -> None:
    key = base_mismatch(expected, actual)
    if key:
        raise StoreError(f"{where}: adapters were trained for base model {expected.get('name')!r} "
                         f"({key} {expected.get(key)}), but the loaded base model {actual.get('name')!r} "
                         f"has {key} {actual.get(key)}")


def build(state: dict, lm, tok) -> MultiTaskModel:
    """An untrained MultiTaskModel with the store's tasks and groups (no weights loaded)."""
    try:
        specs = [(t["name"], AdapterSpec.model_validate(t["adapter"])) for t in state["tasks"]]
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        detail = str(e).splitlines()[-1].strip()
        raise StoreError(f"{HUB_FILE}: a task's adapter spec is malformed ({detail})") from None
    return MultiTaskModel(lm, tok, state["base_model"], specs)


def read_params(store: str | Path, state: dict,
                mtm: MultiTaskModel) -> dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """The stored parameters that fit ``mtm``, as flat vectors checked against its layout.

    Per group key of ``mtm`` that the store also has: ({task name: theta_t (D,)}, Theta (D,)). A task is
    included only when the store holds it in the same group (same adapter spec), so ``mtm`` may have
    tasks the store lacks (a warm start with new tasks, a merge on pull). Checks the fingerprint first.
    """
    store = Path(store)
    check_fingerprint(state["fingerprint"], mtm.fingerprint, str(store / HUB_FILE))
    stored_groups = {g["key"]: gi for gi, g in enumerate(state["groups"])}
    stored_tasks = {t["name"]: t["group"] for t in state["tasks"]}
    theta_global = None
    out = {}
    for g in mtm.groups:
        if g.key not in stored_groups:
            continue
        if theta_global is None:
            theta_global = _load_tensors(store / GLOBAL_FILE)
        prefix = f"{stored_groups[g.key]}/"
        Theta = _flat(g, {k[len(prefix):]: v for k, v in theta_global.items() if k.startswith(prefix)},
                      str(store / GLOBAL_FILE))
        thetas = {}
        for name in (mtm.task_names[t] for t in g.task_ids):
            if stored_tasks.get(name) == g.key:
                path = store / name / NATIVE_FILE
                thetas[name] = _flat(g, _load_tensors(path), str(path))
        out[g.key] = (thetas, Theta)
    return out


def load_into(mtm: MultiTaskModel, store: str | Path, state: dict) -> None:
    """Load every task's native parameters and Theta into ``mtm``, checking fingerprint and shapes."""
    stored = read_params(store, state, mtm)
    params = {}
    for g in mtm.groups:
        names = [mtm.task_names[t] for t in g.task_ids]
        thetas, Theta = stored.get(g.key, ({}, None))
        missing = [n for n in names if n not in thetas]
        if Theta is None or missing:
            raise StoreError(f"{Path(store) / HUB_FILE}: no stored adapter for task(s) {', '.join(missing or names)} "
                             f"in group {g.key}")
        params[g.key] = (torch.stack([thetas[n] for n in names]), Theta)
    mtm.set_params(params)


def load(store: str | Path, lm=None, tok=None) -> tuple[MultiTaskModel, dict]:
    """Load a trained hub for inference; the base model is loaded from the store's record if not given."""
    state = read_state(store)
    if lm is None:
        lm, tok = load_base(state["base_model"])
    mtm = build(state, lm, tok)
    load_into(mtm, store, state)
    return mtm, state
