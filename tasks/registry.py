"""Load, validate and extend tasks.yaml. Every error is collected and reported with its key path."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .schema import HubConfig


class ConfigError(Exception):
    """A user error in a config file; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str], source: str | Path = "tasks.yaml"):
        self.errors = errors
        self.source = str(source)
        super().__init__(f"{self.source}: " + "; ".join(errors))


def _key_path(loc: tuple, raw: Any) -> str:
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(item, int):
            node = node[item] if isinstance(node, list) and item < len(node) else None
            name = node.get("name") if isinstance(node, dict) else None
            parts.append(f"[{item}]" + (f"({name})" if name else ""))
        else:
            tags = ("float", "literal", "str", "int")
            if item in ("function-after", "function-before") or str(item).startswith(tags):
                continue  # pydantic's union/validator tags carry no key
            parts.append(("." if parts else "") + str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "<root>"


def load_yaml(path: str | Path):
    """The parsed YAML document of a file; a missing file or bad YAML is a ConfigError naming where."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(["file not found"], path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"not valid YAML{where}: {getattr(e, 'problem', None) or e}"], path) from None


def read_yaml(path: str | Path) -> dict:
    raw = load_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"<root>: expected a mapping of keys, got {type(raw).__name__}"], path)
    return raw


def validate(raw: dict, base_dir: str | Path, adapter_types: Collection[str] | None = None,
             source: str | Path = "tasks.yaml") -> HubConfig:
    """Validate a raw mapping; raise ConfigError listing every problem at once."""
    errors: list[str] = []
    tasks = raw.get("tasks")
    if isinstance(tasks, list):
        seen: dict[str, int] = {}
        for i, t in enumerate(tasks):
            name = t.get("name") if isinstance(t, dict) else None
            if isinstance(name, str):
                if name in seen:
                    errors.append(f"tasks[{i}].name: duplicate task name {name!r} (first at tasks[{seen[name]}])")
                seen.setdefault(name, i)
    try:
        cfg = HubConfig.model_validate(raw, context={"adapter_types": adapter_types, "base_dir": str(base_dir)})
    except ValidationError as e:
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            errors.append(f"{_key_path(err['loc'], raw)}: {msg}")
        cfg = None
    if errors:
        raise ConfigError(errors, source)
    return cfg


def load_config(path: str | Path = "tasks.yaml", adapter_types: Collection[str] | None = None) -> HubConfig:
    path = Path(path)
    return validate(read_yaml(path), path.resolve().parent, adapter_types, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temp file beside ``path`` and rename it in place (never half-written)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_tasks(config_path: str | Path, fragment_path: str | Path,
              adapter_types: Collection[str] | None = None) -> list[str]:
    """Append the tasks of a YAML fragment (a list, or a mapping with ``tasks:``) to the registry.

    The merged file is validated as a whole first; on any error nothing is written.
    Returns the names of the added tasks.
    """
    config_path, fragment_path = Path(config_path), Path(fragment_path)
    raw = read_yaml(config_path)
    frag = load_yaml(fragment_path)
    new = frag.get("tasks") if isinstance(frag, dict) and "tasks" in frag else frag
    if isinstance(new, dict):
        new = [new]
    if not isinstance(new, list) or not new:
        raise ConfigError(["expected a task mapping, a list of tasks, or 'tasks: [...]'"], fragment_path)
    merged = dict(raw)
    merged["tasks"] = list(raw.get("tasks") or []) + new
    # Data paths in the fragment are relative to the fragment; store them relative to the registry.
    for t in new:
        data = t.get("data") if isinstance(t, dict) else None
        if isinstance(data, dict) and isinstance(data.get("path"), str) and not os.path.isabs(data["path"]):
            p = (fragment_path.resolve().parent / data["path"])
            data["path"] = os.path.relpath(p, config_path.resolve().parent)
    validate(merged, config_path.resolve().parent, adapter_types, config_path)
    text = config_path.read_text(encoding="utf-8")
    atomic_write_text(config_path, _appended(text, new, merged)
                      or yaml.safe_dump(merged, sort_keys=False, allow_unicode=True))
    return [t["name"] for t in new]


def _appended(text: str, new: list, merged: dict) -> str | None:
    """The registry's own text with ``new`` appended to its block-style top-level ``tasks:`` list, so that
    comments and layout survive; None when the layout does not allow it (the caller then rewrites the file)."""
    lines = text.rstrip("\n").split("\n")
    heads = [i for i, line in enumerate(lines) if line.split("#", 1)[0].rstrip() == "tasks:"]
    if len(heads) != 1:
        return None
    rest = lines[heads[0] + 1:]
    items = [line for line in rest if line.lstrip().startswith("- ")]
    if any(line[:1] not in ("", " ", "-", "#") for line in rest):
        return None  # another top-level key follows the list
    indent = " " * (len(items[0]) - len(items[0].lstrip())) if items else "  "
    block = yaml.safe_dump(new, sort_keys=False, allow_unicode=True).rstrip("\n").split("\n")
    out = "\n".join(lines + [indent + line for line in block]) + "\n"
    try:
        return out if yaml.safe_load(out) == merged else None
    except yaml.YAMLError:
        return None
