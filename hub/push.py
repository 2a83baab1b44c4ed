"""`borahub push`: one commit with ``create_commit`` holding the store, its manifest and a model card.

Files the branch already holds with the same content are not uploaded, files the branch holds that the hub
no longer has are deleted, and nothing is committed when nothing changed. A ``--tasks`` subset pushes a hub
of those tasks only (router files left out: a router trained over other tasks does not fit it). The store
is checked first (every file's SHA-256 against hub.json), so a corrupt file is never pushed.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.hf_api import RepoFile

from tasks.schema import AdapterSpec

from . import store
from .card import build_card
from .hub_api import hub_call, subset
from .manifest import CARD, MANIFEST, build_manifest
from .store_check import sha256
from .workspace import Workspace


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit: str
    tasks: list[str]
    uploaded: list[str] = field(default_factory=list)  # files whose content changed on the branch
    deleted: list[str] = field(default_factory=list)  # files the branch had that the hub no longer has
    tag: str | None = None


def _git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _stage(ws: Workspace, state: dict, names: list[str], stage: Path, evaluate: bool) -> dict[str, dict]:
    """Write the hub to push into ``stage``; return the held-out evaluation of tasks that have data."""
    is_subset = names != [t["name"] for t in state["tasks"]]
    eval_names = [n for n in names if evaluate and n in ws.cfg.task_names and ws.cfg.task(n).data is not None]
    mtm = None
    if is_subset or eval_names:
        lm, tok = ws.base()
        mtm = store.build({**state, "tasks": [t for t in state["tasks"] if t["name"] in names]}, lm, tok)
        store.load_into(mtm, ws.store, state)
    if is_subset:
        info = {t["name"]: {k: v for k, v in t.items() if k not in ("name", "group", "adapter")}
                for t in state["tasks"]}
        specs = {t["name"]: AdapterSpec.model_validate(t["adapter"]) for t in state["tasks"]}
        store.save(stage, mtm, state["tau"], info, specs, state.get("metrics"))
    else:  # the store as it is, without symlinks and hidden temp files
        shutil.copytree(ws.store, stage, symlinks=True,
                        ignore=lambda _, entries: [e for e in entries if e.startswith(".") or "checkpoint" in e])
        for p in [p for p in stage.rglob("*") if p.is_symlink()]:
            p.unlink()
    return ws.evaluate(eval_names, mtm=mtm) if eval_names else {}


def _unchanged(remote: RepoFile | None, path: Path) -> bool:
    """True when the branch already holds this content (LFS: sha256; regular files: git blob id)."""
    if remote is None or remote.size != path.stat().st_size:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == sha256(path)
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
    names = subset(tasks, [t["name"] for t in state["tasks"]], f"stored in {ws.store}")
    branch = revision or "main"
    with tempfile.TemporaryDirectory(prefix="borahub-push-") as tmp:
        stage = Path(tmp) / "repo"
        evals = _stage(ws, state, names, stage, evaluate)
        manifest = build_manifest(ws, store.read_state(stage), stage, evals)
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        build_card(manifest, repo_id).save(stage / CARD)
        local = {p.relative_to(stage).as_posix(): p for p in sorted(stage.rglob("*")) if p.is_file()}

        api = HfApi(endpoint=endpoint, token=token)
        with hub_call(f"push {repo_id}", repo_id, branch):
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
