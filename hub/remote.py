"""Push a hub to a Hugging Face Hub model repo, and pull one into the local registry and store.

One model repo holds one hub:

    README.md                  model card (hub/card.py)
    borahub.json               manifest: base model id and fingerprint, tau, the adapter groups with every
                               tensor shape, the task specs (as in tasks.yaml) with data size and held-out
                               perplexity, the router files, and sha256 + size of every other file
    hub.json, global.safetensors, <task>/{adapter_config.json, adapter_model.safetensors, native.safetensors}
                               the local store as it is (hub/store.py), so that
                               ``PeftModel.from_pretrained(base, repo, subfolder=task)`` loads a task
    router.* ...               every other file of the store (checkpoints live outside the store)

Push makes one commit with ``create_commit``: files the branch already holds with the same content are
not uploaded, files the branch holds that the hub no longer has are deleted, and nothing is committed
when nothing changed. A ``--tasks`` subset pushes a hub of those tasks only (router files left out: a
router trained over other tasks does not fit it).

Pull pins the revision to its commit, downloads with ``snapshot_download`` and checks everything before
it writes anything: the manifest, the base-model fingerprint, name clashes, sha256 and size of every
downloaded file, every tensor shape against the local base model, and the merged tasks.yaml. Then the
new store is swapped in and tasks.yaml rewritten, each atomically.

Merging into a non-empty local store builds one model over the union of tasks (registry order):
  * local tasks keep their parameters and pulled tasks get the pulled ones; a name clash is refused
    unless ``force``, which replaces the local task (spec and adapter) by the pulled one;
  * Theta, per adapter group: the local one while any local task of that group remains (it is the prior
    those tasks were trained against, and new tasks cold-start from it), else the pulled one. Task
    outputs depend on theta_t only, so pulled tasks give the logits they gave where they were pushed;
    only the global fallback adapter and later cold starts see the choice;
  * tau and training metrics: the local ones while local tasks remain, else the pulled ones;
  * the router (every store file that is not a task's or the hub's, e.g. router.json/.safetensors): the
    local one while local tasks remain, else the repo's when every task of the repo is pulled. A router
    may route to a subset of the hub's tasks; `borahub router fit` makes pulled tasks with data routable.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import yaml
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from pydantic import BaseModel, Field, ValidationError
from safetensors import safe_open

from models.base import fingerprint, hub_id
from models.multitask import MultiTaskModel
from models.registry import ADAPTERS
from tasks.registry import ConfigError, atomic_write_text, read_yaml, validate
from tasks.schema import AdapterSpec

from . import store
from .card import build_card
from .errors import RemoteError
from .workspace import Workspace

MANIFEST, CARD, FORMAT = "borahub.json", "README.md", 1
SKIP = ("checkpoint", ".")  # store entries never pushed: checkpoints and hidden temp files


# -- manifest ---------------------------------------------------------------------------------------
class _FileEntry(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class _GroupEntry(BaseModel):
    key: str
    spec: dict
    tasks: list[str]
    dim: int
    shapes: dict[str, list[int]]


class _TaskEntry(BaseModel, extra="allow"):
    name: str
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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _group_shapes(global_file: Path, n_groups: int) -> list[dict[str, list[int]]]:
    """Per stored group index, the shape of every tensor of one task (read from Theta's file)."""
    shapes: list[dict[str, list[int]]] = [{} for _ in range(n_groups)]
    with safe_open(str(global_file), "pt") as f:
        for key in f.keys():
            gi, _, name = key.partition("/")
            shapes[int(gi)][name] = list(f.get_slice(key).get_shape())
    return shapes


def build_manifest(ws: Workspace, state: dict, stage: Path, evals: dict[str, dict]) -> dict:
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
    router = _extras(stage, names)
    return {
        "format": FORMAT, "base_model": hub_id(state["base_model"]), "base_model_name": state["base_model"],
        "fingerprint": state["fingerprint"], "tau": state["tau"],
        "groups": [{**g, "shapes": s} for g, s in zip(state["groups"], shapes)],
        "tasks": tasks,
        "router": router,
        "files": {rel: {"sha256": _sha256(p), "size": p.stat().st_size} for rel, p in files.items()},
    }


def _read_manifest(path: Path, where: str) -> dict:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        Manifest.model_validate(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RemoteError(f"{where}: {MANIFEST} is not valid JSON ({e})") from None
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        raise RemoteError(f"{where}: {MANIFEST} is not a BoRA Hub manifest ({loc}: {err['msg']})") from None
    groups = {g["key"] for g in raw["groups"]}
    for t in raw["tasks"]:
        if t["group"] not in groups or not isinstance(t["spec"].get("adapter"), dict):
            raise RemoteError(f"{where}: {MANIFEST}: task {t['name']!r} has no adapter spec or an unknown group")
    return raw


# -- Hub client calls -------------------------------------------------------------------------------
def _client_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises for HTTP and transport failures (httpx or its fork, by version)."""
    errors: list[type[BaseException]] = [OSError, EntryNotFoundError, HFValidationError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(module).HTTPError)
    return tuple(errors)


@contextlib.contextmanager
def _hub_call(what: str, repo_id: str, revision: str | None):
    """Turn a Hub client failure into one RemoteError line."""
    try:
        yield
    except RepositoryNotFoundError:
        raise RemoteError(f"{what}: repository {repo_id!r} not found (or no access with this token)") from None
    except RevisionNotFoundError:
        raise RemoteError(f"{what}: revision {revision!r} not found in {repo_id}") from None
    except EntryNotFoundError:
        raise RemoteError(f"{what}: {repo_id}@{revision or 'main'} has no {MANIFEST}: not a BoRA Hub repo") from None
    except _client_errors() as e:
        raise RemoteError(f"{what}: {' '.join(str(e).split())[:300] or type(e).__name__}") from None


def _subset(requested: list[str] | None, available: list[str], where: str) -> list[str]:
    if not requested:
        return list(available)
    unknown = [n for n in requested if n not in available]
    if unknown:
        raise RemoteError(f"--tasks: unknown task(s) {', '.join(unknown)} ({where}: {', '.join(available)})")
    return [n for n in available if n in requested]


# -- push -------------------------------------------------------------------------------------------
@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit: str
    tasks: list[str]
    uploaded: list[str] = field(default_factory=list)  # files whose content changed on the branch
    deleted: list[str] = field(default_factory=list)  # files the branch had that the hub no longer has
    tag: str | None = None


def _stage(ws: Workspace, state: dict, names: list[str], stage: Path, evaluate: bool) -> dict[str, dict]:
    """Write the hub to push into ``stage``; return the held-out evaluation of tasks that have data."""
    subset = names != [t["name"] for t in state["tasks"]]
    eval_names = [n for n in names if evaluate and n in ws.cfg.task_names and ws.cfg.task(n).data is not None]
    mtm = None
    if subset or eval_names:
        lm, tok = ws.base()
        mtm = store.build({**state, "tasks": [t for t in state["tasks"] if t["name"] in names]}, lm, tok)
        store.load_into(mtm, ws.store, state)
    if subset:
        info = {t["name"]: {k: v for k, v in t.items() if k not in ("name", "group", "adapter")}
                for t in state["tasks"]}
        specs = {t["name"]: AdapterSpec.model_validate(t["adapter"]) for t in state["tasks"]}
        store.save(stage, mtm, state["tau"], info, specs, state.get("metrics"))
    else:
        shutil.copytree(ws.store, stage,
                        ignore=lambda _, entries: [e for e in entries if e.startswith(".") or "checkpoint" in e])
    return ws.evaluate(eval_names, mtm=mtm) if eval_names else {}


def _unchanged(remote: RepoFile | None, path: Path) -> bool:
    """True when the branch already holds this content (LFS: sha256; regular files: git blob id)."""
    if remote is None or remote.size != path.stat().st_size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == _sha256(path)
    return remote.blob_id == _git_blob_sha1(path)


def push(config: str | Path, repo_id: str, *, revision: str | None = None, private: bool = False,
         tasks: list[str] | None = None, tag: str | None = None, evaluate: bool = True, message: str | None = None,
         token: str | None = None, endpoint: str | None = None) -> PushResult:
    """Push the stored hub (or a subset of its tasks) to branch ``revision`` of a Hub model repo.

    ``private`` applies when the repo is created; ``tag`` tags the resulting commit; ``evaluate`` measures
    held-out perplexity for the model card (tasks without data keep what was recorded when pulled).
    """
    ws = Workspace(config)
    state = store.read_state(ws.store)
    names = _subset(tasks, [t["name"] for t in state["tasks"]], f"stored in {ws.store}")
    branch = revision or "main"
    with tempfile.TemporaryDirectory(prefix="borahub-push-") as tmp:
        stage = Path(tmp) / "repo"
        evals = _stage(ws, state, names, stage, evaluate)
        manifest = build_manifest(ws, store.read_state(stage), stage, evals)
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        build_card(manifest, repo_id).save(stage / CARD)
        local = {p.relative_to(stage).as_posix(): p for p in sorted(stage.rglob("*")) if p.is_file()}

        api = HfApi(endpoint=endpoint, token=token)
        with _hub_call(f"push {repo_id}", repo_id, branch):
            api.create_repo(repo_id, private=private, exist_ok=True)
            if branch not in {b.name for b in api.list_repo_refs(repo_id).branches}:
                api.create_branch(repo_id, branch=branch)
            head = api.model_info(repo_id, revision=branch).sha
            remote = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True, revision=head)
                      if isinstance(f, RepoFile)}
            uploaded = [rel for rel, p in local.items() if not _unchanged(remote.get(rel), p)]
            deleted = [rel for rel in remote if rel not in local and rel != ".gitattributes"]
            commit = head
            if uploaded or deleted:
                ops = [CommitOperationAdd(rel, str(local[rel])) for rel in uploaded]
                ops += [CommitOperationDelete(rel) for rel in deleted]
                msg = message or f"borahub push: {len(names)} task(s): {', '.join(names)}"
                commit = api.create_commit(repo_id, operations=ops, commit_message=msg, revision=branch,
                                           parent_commit=head).oid
            if tag:
                api.create_tag(repo_id, tag=tag, revision=commit)
    return PushResult(repo_id, branch, commit, names, uploaded, deleted, tag)


# -- pull -------------------------------------------------------------------------------------------
@dataclass
class PullResult:
    repo_id: str
    revision: str
    commit: str
    tasks: list[str]
    replaced: list[str] = field(default_factory=list)  # local tasks overwritten (--force)
    theta: dict[str, str] = field(default_factory=dict)  # group key -> "local" | "pulled"
    router: str | None = None  # where the store's router files came from: "local", "pulled" or None
    no_data: list[str] = field(default_factory=list)  # pulled tasks registered without data (path not here)


def _check_base(manifest: dict, local_fp: dict, local_name: str, where: str) -> None:
    expected = manifest["fingerprint"]
    if any(expected.get(k) != local_fp[k] for k in ("config_hash", "weights_hash")):
        raise RemoteError(
            f"{where} was built for base model {manifest['base_model_name']!r} (config hash "
            f"{expected.get('config_hash')}, weights hash {expected.get('weights_hash')}), but the local base model "
            f"{local_name!r} has config hash {local_fp['config_hash']}, weights hash {local_fp['weights_hash']}")


def _verify_files(snap: Path, manifest: dict, wanted: list[str], where: str) -> None:
    for rel in wanted:
        entry, path = manifest["files"].get(rel), snap / rel
        if entry is None:
            raise RemoteError(f"{where}: {MANIFEST} lists no checksum for {rel}")
        if not path.is_file():
            raise RemoteError(f"{where}: {rel} is missing from the repo")
        size, sha = path.stat().st_size, _sha256(path)
        if size != entry["size"] or sha != entry["sha256"]:
            raise RemoteError(f"{where}: {rel} is corrupt or truncated ({size} bytes, sha256 {sha[:12]}; "
                              f"{MANIFEST} says {entry['size']} bytes, sha256 {entry['sha256'][:12]})")


def _check_consistent(state: dict, manifest: dict, where: str) -> None:
    ours = {t["name"]: t["group"] for t in manifest["tasks"]}
    theirs = {t["name"]: t["group"] for t in state["tasks"]}
    if ours != theirs or [g["key"] for g in state["groups"]] != [g["key"] for g in manifest["groups"]]:
        raise RemoteError(f"{where}: {store.HUB_FILE} and {MANIFEST} disagree on the tasks or groups")
    store.check_fingerprint(manifest["fingerprint"], state["fingerprint"], f"{where}: {store.HUB_FILE}")


def _check_shapes(manifest: dict, mtm: MultiTaskModel, names: list[str], where: str) -> None:
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


def _merged_registry(ws: Workspace, raw: dict, manifest: dict, names: list[str],
                     where: str) -> tuple[dict, list[str]]:
    """The registry ``raw`` with the pulled task specs (same name: replaced in place; new: appended), validated."""
    tasks = list(raw.get("tasks") or [])
    index = {t.get("name"): i for i, t in enumerate(tasks) if isinstance(t, dict)}
    specs = {t["name"]: t["spec"] for t in manifest["tasks"]}
    no_data = []
    for name in names:
        spec = {**copy.deepcopy(specs[name]), "name": name}
        path = (spec.get("data") or {}).get("path")
        if path is not None and not (ws.base_dir / path).exists():
            spec["data"] = None  # a file on the pushing machine: the task is inference-only here
            no_data.append(name)
        if name in index:
            tasks[index[name]] = spec
        else:
            tasks.append(spec)
    merged = {**raw, "tasks": tasks}
    try:
        cfg = validate(merged, ws.base_dir, ADAPTERS.keys(), ws.config_path)
    except ConfigError as e:
        raise RemoteError(f"{where}: the pulled task specs do not fit {ws.config_path}: "
                          f"{'; '.join(e.errors)}") from None
    for spec in tasks:
        if spec.get("name") in names and cfg.task(spec["name"]).adapter == cfg.adapter:
            del spec["adapter"]  # the registry's default adapter: no need to repeat it
    return merged, no_data


def pull(config: str | Path, repo_id: str, *, revision: str | None = None, tasks: list[str] | None = None,
         force: bool = False, token: str | None = None, endpoint: str | None = None,
         cache_dir: str | Path | None = None) -> PullResult:
    """Pull a pushed hub (or some of its tasks) into the registry ``config`` and its store.

    Nothing is written unless every check passes; see the module docstring for how a merge works.
    Without a registry at ``config``, one is created on the repo's base model.
    """
    api = HfApi(endpoint=endpoint, token=token)
    where = f"{repo_id}@{revision or 'main'}"
    with _hub_call(f"pull {where}", repo_id, revision):
        commit = api.model_info(repo_id, revision=revision).sha
        manifest_file = api.hf_hub_download(repo_id, MANIFEST, revision=commit, cache_dir=cache_dir)
    manifest = _read_manifest(Path(manifest_file), where)
    if Path(config).is_file():
        raw = read_yaml(config)
        ws = Workspace(config)
    else:  # a fresh machine: a registry on the repo's base model
        raw = {"base_model": manifest["base_model_name"], "store": ".borahub/store", "tasks": []}
        ws = Workspace(config, cfg=validate(raw, Path(config).resolve().parent, ADAPTERS.keys(), config))
    names = _subset(tasks, [t["name"] for t in manifest["tasks"]], f"in {where}")
    lm, tok = ws.base()
    _check_base(manifest, fingerprint(lm, ws.cfg.base_model), ws.cfg.base_model, where)

    local_state = store.read_state(ws.store) if (ws.store / store.HUB_FILE).is_file() else None
    local_names = [t["name"] for t in local_state["tasks"]] if local_state else []
    clash = [n for n in names if n in ws.cfg.task_names or n in local_names]
    if clash and not force:
        raise RemoteError(f"pull {where}: task(s) {', '.join(clash)} already registered here "
                          "(use --force to replace them)")
    kept = [n for n in local_names if n not in names]
    all_pulled = len(names) == len(manifest["tasks"])
    router = _extras(ws.store, local_names) if kept else manifest["router"] if all_pulled else []
    router_src = "local" if kept else "pulled"

    wanted = [store.HUB_FILE, store.GLOBAL_FILE, *(f"{n}/{store.NATIVE_FILE}" for n in names)]
    wanted += router if router_src == "pulled" else []
    with _hub_call(f"pull {where}", repo_id, revision):
        snap = Path(api.snapshot_download(repo_id, revision=commit, allow_patterns=wanted, cache_dir=cache_dir))
    _verify_files(snap, manifest, wanted, where)
    pulled_state = store.read_state(snap)
    _check_consistent(pulled_state, manifest, where)
    raw, no_data = _merged_registry(ws, raw, manifest, names, where)

    # One model over the union of tasks, in the order of the merged registry (store-only tasks last).
    reg_order = [t["name"] for t in raw["tasks"]]
    members = set(kept) | set(names)
    order = [n for n in reg_order if n in members] + [n for n in kept if n not in reg_order]
    entries = {t["name"]: t for t in (local_state or {"tasks": []})["tasks"] if t["name"] in kept}
    entries.update({t["name"]: {**t, "adapter": t["spec"]["adapter"]} for t in manifest["tasks"] if t["name"] in names})
    specs = {n: AdapterSpec.model_validate(entries[n]["adapter"]) for n in order}
    for n in names:
        if specs[n].group_key() != entries[n]["group"]:
            raise RemoteError(f"{where}: {MANIFEST}: task {n!r} is in group {entries[n]['group']}, "
                              f"but its adapter spec makes group {specs[n].group_key()}")
    mtm = MultiTaskModel(lm, tok, ws.cfg.base_model, [(n, specs[n]) for n in order])
    _check_shapes(manifest, mtm, names, where)
    pulled = store.read_params(snap, _only(pulled_state, names), mtm)  # every tensor checked against the model
    local = store.read_params(ws.store, _only(local_state, kept), mtm) if kept else {}
    theta_src = _merge_params(mtm, names, pulled, local, where)

    info = {n: {k: v for k, v in entries[n].items() if k not in ("name", "group", "adapter", "spec")} for n in order}
    for n in names:
        info[n]["source"] = f"{repo_id}@{commit}"
    tau = local_state["tau"] if kept else manifest["tau"]
    metrics = local_state.get("metrics") if kept else pulled_state.get("metrics")

    def write_store(staged: Path) -> None:
        store.save(staged, mtm, tau, info, specs, metrics)
        for rel in router:
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile((ws.store if router_src == "local" else snap) / rel, staged / rel)

    _swap_in(ws, raw, write_store)
    return PullResult(repo_id, revision or "main", commit, names, [n for n in names if n in clash],
                      theta_src, router_src if router else None, no_data)


def _extras(store_dir: Path, task_names: list[str]) -> list[str]:
    """Files of a store that belong to no task and are not the hub's own (the router's), relative paths."""
    files = [p.relative_to(store_dir).as_posix() for p in sorted(store_dir.rglob("*")) if p.is_file()]
    return [rel for rel in files if rel not in (store.HUB_FILE, store.GLOBAL_FILE)
            and rel.split("/")[0] not in task_names and not rel.startswith(".")]


def _only(state: dict, names: list[str]) -> dict:
    """``state`` restricted to the tasks ``names`` (groups unchanged: they index the Theta file)."""
    return {**state, "tasks": [t for t in state["tasks"] if t["name"] in names]}


def _merge_params(mtm: MultiTaskModel, names: list[str], pulled: dict, local: dict, where: str) -> dict[str, str]:
    """Load pulled tasks from ``pulled``, the others from ``local`` (both ``store.read_params``), and per
    group the local Theta while a local task of the group remains, else the pulled one. Returns the
    source of each group's Theta."""
    params, theta_src = {}, {}
    for g in mtm.groups:
        local_thetas, local_Theta = local.get(g.key, ({}, None))
        pulled_thetas, pulled_Theta = pulled.get(g.key, ({}, None))
        rows = []
        for n in (mtm.task_names[t] for t in g.task_ids):
            source = pulled_thetas if n in names else local_thetas
            if n not in source:
                raise RemoteError(f"{where}: no stored parameters for task {n!r} in group {g.key}")
            rows.append(source[n])
        use_local = bool(local_thetas)
        params[g.key] = (torch.stack(rows), local_Theta if use_local else pulled_Theta)
        theta_src[g.key] = "local" if use_local else "pulled"
    mtm.set_params(params)
    return theta_src


def _swap_in(ws: Workspace, raw: dict, write_store) -> None:
    """Build the new store beside the old one, swap it in, then rewrite tasks.yaml; restore on failure."""
    ws.store.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{ws.store.name}.pull.", dir=ws.store.parent))
    try:
        staged, old = tmp / "store", tmp / "old"
        write_store(staged)
        had_store = ws.store.exists()
        if had_store:
            os.replace(ws.store, old)
        os.replace(staged, ws.store)
        try:
            atomic_write_text(ws.config_path, yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
        except BaseException:
            shutil.rmtree(ws.store)
            if had_store:
                os.replace(old, ws.store)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
