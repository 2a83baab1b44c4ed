"""What a store folder is, and the checks that keep it (and everything around it) safe.

A store is recognisable: its ``hub.json`` carries ``"borahub": "store"``. Saves replace the store folder
wholesale, so a save refuses any existing folder that is not empty and not a store (a ``store:`` pointing
at the project or a data folder would otherwise be deleted). ``hub.json`` lists the size and SHA-256 of
every file the save wrote; loads check them, so a truncated, replaced (e.g. pickled) or reshaped file is
reported, never used or pushed. Task names and file names from ``hub.json`` must stay inside the store.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.atomic import UnsafePath, inside
from tasks.schema import TaskName

HUB_FILE = "hub.json"
MARKER = {"borahub": "store"}
FORMAT = 1
MAX_STATE_BYTES = 64 * 2**20  # hub.json is a few KB per task


class StoreError(Exception):
    """The store is missing, corrupt, or does not fit the base model (user-facing)."""


class _File(BaseModel):
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _Group(BaseModel, extra="allow"):
    key: str
    spec: dict
    tasks: list[str]
    dim: int = Field(ge=0)


class _Task(BaseModel, extra="allow"):
    name: TaskName
    group: str
    adapter: dict


class StoreState(BaseModel):
    """The shape ``hub.json`` must have (checked before any of it is used)."""

    model_config = ConfigDict(extra="allow")
    borahub: str = Field(pattern="^store$")
    format: int
    base_model: str
    fingerprint: dict[str, str]
    tau: float | str
    groups: list[_Group]
    tasks: list[_Task]
    metrics: dict = Field(default_factory=dict)
    files: dict[str, _File]  # every file the save wrote: size and SHA-256


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_record(folder: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file below ``folder`` (relative POSIX paths)."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def parse_state(raw: bytes, where: str) -> dict:
    """hub.json's bytes as a checked state dict, or StoreError naming what is wrong."""
    if len(raw) > MAX_STATE_BYTES:
        raise StoreError(f"{where}: too large ({len(raw)} bytes) for a hub.json")
    try:
        state = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise StoreError(f"{where}: not valid JSON ({str(e)[:120]})") from None
    if not isinstance(state, dict) or state.get("borahub") != "store":
        raise StoreError(f"{where}: not a BoRA Hub store (no \"borahub\": \"store\" marker)")
    if state.get("format") != FORMAT:
        raise StoreError(f"{where}: unsupported store format {state.get('format')!r}")
    try:
        StoreState.model_validate(state)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "<root>"
        raise StoreError(f"{where}: malformed ({loc}: {err['msg'].removeprefix('Value error, ')})") from None
    groups = {g["key"] for g in state["groups"]}
    for t in state["tasks"]:
        if t["group"] not in groups:
            raise StoreError(f"{where}: task {t['name']!r} names unknown group {t['group']!r}")
    names = [t["name"] for t in state["tasks"]]
    if len(set(names)) != len(names):
        raise StoreError(f"{where}: a task name appears twice")
    return state


def verify_files(store: Path, state: dict, where: str) -> None:
    """Every file hub.json lists is inside the store, a plain file, and has its recorded size and SHA-256."""
    for rel, entry in state["files"].items():
        try:
            path = inside(store, rel, "file")
        except UnsafePath as e:
            raise StoreError(f"{where}: {e}") from None
        if not path.is_file():
            raise StoreError(f"{store / rel}: missing (hub.json lists it); retrain or pull the hub again")
        size = path.stat().st_size
        if size != entry["size"] or sha256(path) != entry["sha256"]:
            raise StoreError(f"{store / rel}: changed since it was saved ({size} bytes, hub.json says "
                             f"{entry['size']} and another SHA-256): corrupt or edited; retrain or pull again")


def is_store(path: Path) -> bool:
    """True when ``path`` holds a BoRA Hub store (its hub.json carries the marker)."""
    try:
        state = json.loads((path / HUB_FILE).read_bytes()[:MAX_STATE_BYTES])
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(state, dict) and state.get("borahub") == "store"


def check_target(store: Path) -> None:
    """Refuse to replace anything at ``store`` but nothing, an empty folder, or a store."""
    if store.is_symlink() or store.exists() and not store.is_dir():
        raise StoreError(f"store {store}: exists and is not a folder; refusing to replace it")
    if store.is_dir() and any(store.iterdir()) and not is_store(store):
        raise StoreError(f"store {store}: folder exists, is not empty and holds no BoRA Hub store "
                         f"({HUB_FILE} with the store marker); refusing to replace it: point `store:` "
                         "at a new folder")
