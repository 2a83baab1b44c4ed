"""`borahub pull`: check everything a repo holds (hub/manifest.py), then merge its tasks into the local
registry and store, each swapped in atomically.

Merging into a non-empty local store builds one model over the union of tasks (registry order):
  * local tasks keep their parameters and pulled tasks get the pulled ones; a name clash is refused
    unless ``force``, which replaces the local task (spec and adapter) by the pulled one;
  * Theta, per adapter group: the local one while any local task of that group remains (it is the prior
    those tasks were trained against, and new tasks cold-start from it), else the pulled one. Task
    outputs depend on theta_t only, so pulled tasks give the logits they gave where they were pushed;
    only the global fallback adapter and later cold starts see the choice;
  * tau and training metrics: the local ones while local tasks remain, else the pulled ones;
  * the router files: the local ones while local tasks remain, else the repo's when every task of the repo
    is pulled. `borahub router fit` makes pulled tasks with data routable;
  * data: a pulled spec never points at a file of this machine. A ``path`` source is dropped (the task is
    inference-only until the user gives it data); a task replaced with ``force`` keeps the local data
    source; Hub dataset ids and the embedded BBC topics are kept.
"""
from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoFile

from models.base import fingerprint
from models.multitask import MultiTaskModel
from models.registry import ADAPTERS
from tasks.atomic import atomic_write_text, inside, replace_dir, temp_dir_beside
from tasks.registry import ConfigError, read_yaml, validate
from tasks.schema import AdapterSpec

from . import manifest as mf
from . import store
from .errors import RemoteError
from .hub_api import hub_call, subset
from .workspace import Workspace


@dataclass
class PullResult:
    repo_id: str
    revision: str
    commit: str
    tasks: list[str]
    replaced: list[str] = field(default_factory=list)  # local tasks overwritten (--force)
    theta: dict[str, str] = field(default_factory=dict)  # group key -> "local" | "pulled"
    router: str | None = None  # where the store's router files came from: "local", "pulled" or None
    no_data: list[str] = field(default_factory=list)  # pulled tasks registered without data (inference only)


def _merged_registry(ws: Workspace, raw: dict, manifest: dict, names: list[str],
                     where: str) -> tuple[dict, list[str]]:
    """The registry ``raw`` with the pulled task specs (same name: replaced in place; new: appended), validated."""
    tasks = list(raw.get("tasks") or [])
    index = {t.get("name"): i for i, t in enumerate(tasks) if isinstance(t, dict)}
    specs = {t["name"]: t["spec"] for t in manifest["tasks"]}
    no_data = []
    for name in names:
        spec = {**copy.deepcopy(specs[name]), "name": name}
        local = tasks[index[name]] if name in index else {}
        if isinstance(local, dict) and local.get("data") is not None:
            spec["data"] = local["data"]  # --force replaces the adapter, the user's data source stays
        elif isinstance(spec.get("data"), dict) and spec["data"].get("path") is not None:
            spec["data"] = None  # a file of the pushing machine: never read one of this machine in its place
        if spec.get("data") is None:
            spec.pop("data", None)
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


def _model(ws: Workspace, manifest: dict, raw: dict, names: list[str], kept: list[str], local_state: dict | None,
           where: str) -> tuple[MultiTaskModel, dict, dict]:
    """One model over the union of tasks, in the order of the merged registry (store-only tasks last)."""
    reg_order = [t["name"] for t in raw["tasks"]]
    members = set(kept) | set(names)
    order = [n for n in reg_order if n in members] + [n for n in kept if n not in reg_order]
    entries = {t["name"]: t for t in (local_state or {"tasks": []})["tasks"] if t["name"] in kept}
    entries.update({t["name"]: {**t, "adapter": t["spec"]["adapter"]} for t in manifest["tasks"] if t["name"] in names})
    try:
        specs = {n: AdapterSpec.model_validate(entries[n]["adapter"], context={"adapter_types": ADAPTERS.keys()})
                 for n in order}
    except ValueError as e:
        raise RemoteError(f"{where}: {mf.MANIFEST}: an adapter spec is malformed "
                          f"({str(e).splitlines()[-1].strip()})") from None
    for n in names:
        if specs[n].group_key() != entries[n]["group"]:
            raise RemoteError(f"{where}: {mf.MANIFEST}: task {n!r} is in group {entries[n]['group']}, "
                              f"but its adapter spec makes group {specs[n].group_key()}")
    lm, tok = ws.base()
    try:
        mtm = MultiTaskModel(lm, tok, ws.cfg.base_model, [(n, specs[n]) for n in order])
    except (ValueError, KeyError) as e:
        raise RemoteError(f"{where}: the pulled adapters do not fit the local base model ({e})") from None
    return mtm, specs, entries


def pull(config: str | Path, repo_id: str, *, revision: str | None = None, tasks: list[str] | None = None,
         force: bool = False, token: str | None = None, endpoint: str | None = None,
         cache_dir: str | Path | None = None) -> PullResult:
    """Pull a pushed hub (or some of its tasks) into the registry ``config`` and its store.

    Nothing is written unless every check passes; see the module docstring for how a merge works.
    Without a registry at ``config``, one is created on the repo's base model.
    """
    api = HfApi(endpoint=endpoint, token=token)
    where = f"{repo_id}@{revision or 'main'}"
    with hub_call(f"pull {where}", repo_id, revision):
        commit = api.model_info(repo_id, revision=revision).sha
        sizes = {f.path: f.size for f in api.list_repo_tree(repo_id, recursive=True, revision=commit)
                 if isinstance(f, RepoFile)}
        if sizes.get(mf.MANIFEST, 0) > mf.MAX_MANIFEST_BYTES:
            raise RemoteError(f"{where}: {mf.MANIFEST} is larger than {mf.MAX_MANIFEST_BYTES} bytes")
        manifest_file = api.hf_hub_download(repo_id, mf.MANIFEST, revision=commit, cache_dir=cache_dir)
    manifest = mf.read_manifest(Path(manifest_file), where)
    if Path(config).is_file():
        raw = read_yaml(config)
        ws = Workspace(config)
    else:  # a fresh machine: a registry on the repo's base model
        raw = {"base_model": manifest["base_model_name"], "store": ".borahub/store", "tasks": []}
        ws = Workspace(config, cfg=validate(raw, Path(config).resolve().parent, ADAPTERS.keys(), config))
    names = subset(tasks, [t["name"] for t in manifest["tasks"]], f"in {where}")
    lm, _ = ws.base()
    mf.check_base(manifest, fingerprint(lm, ws.cfg.base_model), ws.cfg.base_model, where)
    store.check_target(ws.store)

    local_state = store.read_state(ws.store) if (ws.store / store.HUB_FILE).is_file() else None
    local_names = [t["name"] for t in local_state["tasks"]] if local_state else []
    clash = [n for n in names if n in ws.cfg.task_names or n in local_names]
    if clash and not force:
        raise RemoteError(f"pull {where}: task(s) {', '.join(clash)} already registered here "
                          "(use --force to replace them)")
    kept = [n for n in local_names if n not in names]
    all_pulled = len(names) == len(manifest["tasks"])
    router = mf.router_files(ws.store, local_names) if kept else manifest["router"] if all_pulled else []
    router_src = "local" if kept else "pulled"
    raw, no_data = _merged_registry(ws, raw, manifest, names, where)
    mtm, specs, entries = _model(ws, manifest, raw, names, kept, local_state, where)
    mf.check_shapes(manifest, mtm, names, where)

    wanted = [store.HUB_FILE, store.GLOBAL_FILE, *(f"{n}/{store.NATIVE_FILE}" for n in names)]
    wanted += router if router_src == "pulled" else []
    max_numel = 2 * sum(p.numel() for p in lm.parameters())
    mf.check_remote_sizes(manifest, sizes, wanted, max_numel, where)
    with hub_call(f"pull {where}", repo_id, revision):
        snap = Path(api.snapshot_download(repo_id, revision=commit, allow_patterns=wanted, cache_dir=cache_dir))
    mf.verify_files(snap, manifest, wanted, where)
    try:
        pulled_state = store.read_state(snap, verify=False)  # the files were checked against the manifest
    except store.StoreError as e:
        raise RemoteError(f"{where}: {e}") from None
    mf.check_consistent(pulled_state, manifest, where)
    pulled = store.read_params(snap, _only(pulled_state, names), mtm)  # every tensor checked against the model
    local = store.read_params(ws.store, _only(local_state, kept), mtm) if kept else {}
    theta_src = _merge_params(mtm, names, pulled, local, where)

    info = {n: {k: v for k, v in entries[n].items() if k not in ("name", "group", "adapter", "spec")}
            for n in mtm.task_names}
    for n in names:
        info[n]["source"] = f"{repo_id}@{commit}"
    tau = local_state["tau"] if kept else manifest["tau"]
    metrics = local_state.get("metrics") if kept else pulled_state.get("metrics")

    def write_store(staged: Path) -> None:
        store.save(staged, mtm, tau, info, specs, metrics)
        for rel in router:
            # names checked (manifest.py): plain top-level files; a snapshot's files are links into the
            # download cache by design, so only the destination is resolved
            source = (ws.store if router_src == "local" else snap) / rel
            shutil.copyfile(source, inside(staged, rel, "router file"))

    _swap_in(ws, raw, write_store)
    return PullResult(repo_id, revision or "main", commit, names, [n for n in names if n in clash],
                      theta_src, router_src if router else None, no_data)


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
    tmp = temp_dir_beside(ws.store)
    try:
        staged, old = tmp / "store", tmp / "old"
        write_store(staged)
        had_store = ws.store.exists()
        replace_dir(staged, ws.store, keep_old=old)
        try:
            atomic_write_text(ws.config_path, yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
        except BaseException:
            if had_store:
                replace_dir(old, ws.store)
            else:
                shutil.rmtree(ws.store)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
