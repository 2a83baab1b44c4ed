"""``borahub.json``, the manifest of a pushed hub, and every check a pull makes before it writes anything.

Everything in a pulled repo is untrusted. This file is the whole of what a pull believes about one, so
that a reviewer can audit it in one place:

* the manifest is at most MAX_MANIFEST_BYTES of JSON of the shape :class:`Manifest`;
* task names are task names (no path, not a reserved file name), unique, each in a declared group;
* every file name is a plain relative path inside the repo, router files are plain top-level names that
  are neither the hub's own files nor a task's folder;
* before any download, the repo's files have the sizes the manifest declares, and those sizes are
  bounded: adapter tensors by the shapes declared for their group (float32 plus a header), everything
  else by MAX_OTHER_BYTES;
* after the download, every file has the declared size and SHA-256, hub.json agrees with the manifest,
  and every declared tensor shape is what the local base model needs.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator
from safetensors import safe_open

from models.base import base_mismatch, hub_id
from models.multitask import MultiTaskModel
from tasks.atomic import UnsafePath, check_relative
from tasks.schema import TaskName

from . import store
from .errors import RemoteError
from .store_check import sha256

MANIFEST, CARD, FORMAT = "borahub.json", "README.md", 1
MAX_MANIFEST_BYTES = 16 * 2**20
MAX_OTHER_BYTES = 256 * 2**20  # hub.json, configs, router files: small
HEADER_BYTES = 2**20  # a safetensors header (names, shapes) on top of the tensor bytes
ROUTER_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
RESERVED = {store.HUB_FILE, store.GLOBAL_FILE, MANIFEST, CARD, ".gitattributes"}


def _safe_rel(rel: str) -> str:
    try:
        return check_relative(rel, "file")
    except UnsafePath as e:
        raise ValueError(str(e)) from None


class _FileEntry(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class _GroupEntry(BaseModel):
    key: str
    spec: dict
    tasks: list[str]
    dim: int = Field(ge=0)
    shapes: dict[str, list[int]]


class _TaskEntry(BaseModel, extra="allow"):
    name: TaskName
    group: str
    spec: dict


class Manifest(BaseModel):
    """What ``borahub.json`` must hold (checked on pull before anything else is read)."""

    format: Literal[1]
    base_model: str
    base_model_name: str
    fingerprint: dict[str, str]
    tau: float | Literal["shared"]
    groups: list[_GroupEntry]
    tasks: list[_TaskEntry] = Field(min_length=1)
    router: list[str]
    files: dict[str, _FileEntry]

    @field_validator("files")
    @classmethod
    def _paths(cls, v: dict) -> dict:
        for rel in v:
            _safe_rel(rel)
        return v

    @field_validator("router")
    @classmethod
    def _router(cls, v: list[str]) -> list[str]:
        for rel in v:
            if not ROUTER_FILE.fullmatch(rel) or rel in RESERVED or ".." in rel:
                raise ValueError(f"router file {rel!r} is not a plain file name of the store")
        return v


def read_manifest(path: Path, where: str) -> dict:
    """The checked manifest (see the module docstring), or one RemoteError line."""
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise RemoteError(f"{where}: {MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        Manifest.model_validate(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise RemoteError(f"{where}: {MANIFEST} is not valid JSON ({str(e)[:100]})") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        raise RemoteError(f"{where}: {MANIFEST} is not a BoRA Hub manifest ({loc}: {msg})") from None
    groups = {g["key"] for g in raw["groups"]}
    names = [t["name"] for t in raw["tasks"]]
    if len(set(n.lower() for n in names)) != len(names):
        raise RemoteError(f"{where}: {MANIFEST}: a task name appears twice")
    for t in raw["tasks"]:
        if t["group"] not in groups or not isinstance(t["spec"].get("adapter"), dict):
            raise RemoteError(f"{where}: {MANIFEST}: task {t['name']!r} has no adapter spec or an unknown group")
    clash = [r for r in raw["router"] if r in names]
    if clash:
        raise RemoteError(f"{where}: {MANIFEST}: router file {clash[0]!r} is also a task name")
    return raw


def build_manifest(ws, state: dict, stage: Path, evals: dict[str, dict]) -> dict:
    """The manifest of the hub staged in ``stage`` (``state`` is its hub.json)."""
    names = [t["name"] for t in state["tasks"]]
    shapes = _group_shapes(stage / store.GLOBAL_FILE, len(state["groups"]))
    tasks = []
    for t in state["tasks"]:
        name = t["name"]
        spec = ws.cfg.task(name).model_dump(mode="json", exclude_defaults=True) if name in ws.cfg.task_names else {}
        spec["name"] = name
        spec["adapter"] = {k: v for k, v in t["adapter"].items() if v is not None}  # what the weights were trained with
        info = {k: v for k, v in t.items() if k not in ("name", "group", "adapter")}
        if name in evals:
            e = evals[name]
            info.update(perplexity=round(e["perplexity"], 4), base_perplexity=round(e["base_perplexity"], 4),
                        eval_docs=e["docs"])
        tasks.append({"name": name, "group": t["group"], "spec": spec, **info})
    files = {p.relative_to(stage).as_posix(): p for p in sorted(stage.rglob("*")) if p.is_file()}
    files = {rel: p for rel, p in files.items() if rel not in (MANIFEST, CARD)}
    return {
        "format": FORMAT, "base_model": hub_id(state["base_model"]), "base_model_name": state["base_model"],
        "fingerprint": state["fingerprint"], "tau": state["tau"],
        "groups": [{**g, "shapes": s} for g, s in zip(state["groups"], shapes)],
        "tasks": tasks,
        "router": router_files(stage, names),
        "files": {rel: {"sha256": sha256(p), "size": p.stat().st_size} for rel, p in files.items()},
    }


def _group_shapes(global_file: Path, n_groups: int) -> list[dict[str, list[int]]]:
    """Per stored group index, the shape of every tensor of one task (read from Theta's file)."""
    shapes: list[dict[str, list[int]]] = [{} for _ in range(n_groups)]
    with safe_open(str(global_file), "pt") as f:
        for key in f.keys():
            gi, _, name = key.partition("/")
            shapes[int(gi)][name] = list(f.get_slice(key).get_shape())
    return shapes


def router_files(store_dir: Path, task_names: list[str]) -> list[str]:
    """The router's files in a store: top-level plain files that are neither the hub's nor a task's."""
    return [p.name for p in sorted(store_dir.iterdir())
            if p.is_file() and not p.is_symlink() and p.name not in RESERVED and p.name not in task_names
            and ROUTER_FILE.fullmatch(p.name)]


def size_limit(manifest: dict, rel: str) -> int:
    """The most bytes file ``rel`` of a repo may take: float32 tensors of the declared shapes plus a
    header for the adapter files, MAX_OTHER_BYTES for the rest."""
    groups = {g["key"]: g for g in manifest["groups"]}
    task_group = {t["name"]: t["group"] for t in manifest["tasks"]}
    head, _, tail = rel.rpartition("/")

    def numel(group: dict) -> int:
        return sum(math.prod(s) for s in group["shapes"].values())

    if rel == store.GLOBAL_FILE:
        return HEADER_BYTES + 4 * sum(numel(g) for g in groups.values())
    if head in task_group and tail in (store.NATIVE_FILE, store.PEFT_WEIGHTS):
        return HEADER_BYTES + 4 * numel(groups[task_group[head]])
    return MAX_OTHER_BYTES


def check_remote_sizes(manifest: dict, remote_sizes: dict[str, int], wanted: list[str], max_group_numel: int,
                       where: str) -> None:
    """Before downloading: each wanted file exists in the repo with the manifest's size, within its bound.
    ``max_group_numel`` bounds the parameters of one adapter (shapes of groups the local model does not
    have are not otherwise checked)."""
    for g in manifest["groups"]:
        numel = sum(math.prod(s) for s in g["shapes"].values())
        if any(d < 0 for s in g["shapes"].values() for d in s) or numel > max_group_numel:
            raise RemoteError(f"{where}: {MANIFEST}: group {g['key']} declares implausible tensor shapes")
    for rel in wanted:
        entry = manifest["files"].get(rel)
        if entry is None:
            raise RemoteError(f"{where}: {MANIFEST} lists no checksum for {rel}")
        if rel not in remote_sizes:
            raise RemoteError(f"{where}: {rel} is missing from the repo")
        if entry["size"] > size_limit(manifest, rel):
            raise RemoteError(f"{where}: {MANIFEST} says {rel} has {entry['size']} bytes, more than its shapes "
                              f"allow ({size_limit(manifest, rel)}); refusing to download it")
        if remote_sizes[rel] != entry["size"]:
            raise RemoteError(f"{where}: {rel} has {remote_sizes[rel]} bytes in the repo, {MANIFEST} says "
                              f"{entry['size']}; refusing to download it")


def verify_files(snap: Path, manifest: dict, wanted: list[str], where: str) -> None:
    """After downloading: every wanted file is inside the snapshot with the declared size and SHA-256."""
    for rel in wanted:
        entry = manifest["files"].get(rel)
        if entry is None:
            raise RemoteError(f"{where}: {MANIFEST} lists no checksum for {rel}")
        path = snap / rel
        if not path.is_file():
            raise RemoteError(f"{where}: {rel} is missing from the repo")
        size, sha = path.stat().st_size, sha256(path)
        if size != entry["size"] or sha != entry["sha256"]:
            raise RemoteError(f"{where}: {rel} is corrupt or truncated ({size} bytes, sha256 {sha[:12]}; "
                              f"{MANIFEST} says {entry['size']} bytes, sha256 {entry['sha256'][:12]})")


def check_consistent(state: dict, manifest: dict, where: str) -> None:
    ours = {t["name"]: t["group"] for t in manifest["tasks"]}
    theirs = {t["name"]: t["group"] for t in state["tasks"]}
    if ours != theirs or [g["key"] for g in state["groups"]] != [g["key"] for g in manifest["groups"]]:
        raise RemoteError(f"{where}: {store.HUB_FILE} and {MANIFEST} disagree on the tasks or groups")
    store.check_fingerprint(manifest["fingerprint"], state["fingerprint"], f"{where}: {store.HUB_FILE}")


def check_base(manifest: dict, local_fp: dict, local_name: str, where: str) -> None:
    expected = manifest["fingerprint"]
    if base_mismatch(expected, local_fp):
        raise RemoteError(
            f"{where} was built for base model {manifest['base_model_name']!r} (config hash "
            f"{expected.get('config_hash')}, weights hash {expected.get('weights_hash')}), but the local base model "
            f"{local_name!r} has config hash {local_fp['config_hash']}, weights hash {local_fp['weights_hash']}")


def check_shapes(manifest: dict, mtm: MultiTaskModel, names: list[str], where: str) -> None:
    """Every tensor shape the manifest declares for the pulled tasks' groups is what the local model needs."""
    groups = {g.key: g for g in mtm.groups}
    for entry in manifest["groups"]:
        if not set(entry["tasks"]) & set(names):
            continue
        g = groups.get(entry["key"])
        if g is None:
            raise RemoteError(f"{where}: {MANIFEST}: group {entry['key']} does not match its tasks' adapter spec")
        need = {f"{m}:{p}": list(s.shape) for m, p, s in g.slices()}
        for name in sorted(set(need) | set(entry["shapes"])):
            got = entry["shapes"].get(name)
            if got != need.get(name):
                raise RemoteError(f"{where}: {MANIFEST}: group {entry['key']} tensor {name} has shape {got}; "
                                  f"the local base model needs {need.get(name)}")
