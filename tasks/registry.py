"""Load, validate and extend tasks.yaml. Every error is collected and reported with its key path."""
from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .atomic import atomic_write_text, is_within
from .schema import HubConfig

MAX_DEPTH = 32  # a registry is a few levels deep; deeper nesting is a mistake (or an attack on the parser)


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (the first one would be silently overridden)",
                        key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _depth(node, limit: int) -> int:
    """Nesting depth of a parsed document, counted without recursion, stopping past ``limit``."""
    stack, deepest = [(node, 0)], 0
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


def load_yaml(path: str | Path):
    """The parsed YAML document of a file; a missing or unreadable file or bad YAML is a ConfigError naming
    where (duplicate keys and nesting deeper than MAX_DEPTH included)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(["file not found" if not path.exists() else "not a file"], path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"cannot read ({e.strerror or e})"], path) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"not UTF-8 text (byte {e.start})"], path) from None
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"not valid YAML{where}: {getattr(e, 'problem', None) or e}"], path) from None
    except RecursionError:  # the parser recursed past Python's limit: deeper still
        raise ConfigError([f"nested deeper than {MAX_DEPTH} levels"], path) from None
    if _depth(doc, MAX_DEPTH) > MAX_DEPTH:
        raise ConfigError([f"nested deeper than {MAX_DEPTH} levels"], path)
    return doc


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
    if cfg is not None:
        errors += _store_placement(cfg, Path(base_dir))
    if errors:
        raise ConfigError(errors, source)
    return cfg


def _store_placement(cfg: HubConfig, base_dir: Path) -> list[str]:
    """A store is replaced wholesale by every save, so it must never hold the registry or any data file."""
    store = base_dir / cfg.store
    if is_within(base_dir, store):  # (then its data files too, as a rule: one line says it)
        return [f"store: {cfg.store!r} would contain the registry's folder; "
                "use a folder of its own (default: .borahub/store)"]
    errors = []
    for t in cfg.tasks:
        if t.data is not None and t.data.path is not None and is_within(base_dir / t.data.path, store):
            errors.append(f"tasks({t.name}).data.path: {t.data.path!r} lies inside the store {cfg.store!r}, "
                          "which every training run replaces; keep data outside it")
    return errors


def load_config(path: str | Path = "tasks.yaml", adapter_types: Collection[str] | None = None) -> HubConfig:
    path = Path(path)
    return validate(read_yaml(path), path.resolve().parent, adapter_types, path)


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
    try:
        atomic_write_text(config_path, _appended(text, new, merged)
                          or yaml.safe_dump(merged, sort_keys=False, allow_unicode=True))
    except OSError as e:
        raise ConfigError([f"cannot write ({e.strerror or e}); nothing was changed"], config_path) from None
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
