"""Malformed registries and bad command lines, table-driven: each is exit 2, one error line naming what and
where, no traceback, and the project folder byte-identical afterwards (SHA-256 of every file)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from hub.cli import main


def checksums(root: Path) -> dict[str, str]:
    """Every entry below ``root``: SHA-256 of files, "dir" for folders, the target of symlinks (not followed)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = f"link -> {p.readlink()}"
        else:
            out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of the CLI run in-process (argparse's exit included)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("borahub: error: "), err
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]


def setitem(path: str, value):
    """A mutation of the parsed registry: set the value at a dotted path (list indices as numbers)."""
    def apply(cfg: dict) -> None:
        *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
        node = cfg
        for k in parents:
            node = node[k]
        node[last] = value
    return apply


INF, NAN = float("inf"), float("nan")
VALIDATE = ["tasks", "validate"]
TRAIN = ["train", "--steps", "1", "--quiet"]

# id: (mutation of the parsed registry, or text/bytes for the whole file; command; expected in the error line)
CASES = {
    # the store may never hold the registry or data (the first two wiped the project before)
    "store is the project folder": (setitem("store", "."), VALIDATE, "would contain the registry's folder"),
    "store is the parent folder": (setitem("store", ".."), VALIDATE, "would contain the registry's folder"),
    "store is empty": (setitem("store", ""), VALIDATE, "would contain the registry's folder"),
    "data inside the store": (setitem("store", "."), TRAIN, "would contain the registry's folder"),
    "store holds the data": (lambda c, root: ((root / "data").mkdir(), (root / "data" / "a.jsonl").write_text("{}"),
                                              c.__setitem__("store", "data"),
                                              c["tasks"][0]["data"].__setitem__("path", "data/a.jsonl")),
                             VALIDATE, "lies inside the store"),
    # non-finite and absurd numbers
    "lr inf": (setitem("training.lr", INF), VALIDATE, "training.lr"),
    "lr nan": (setitem("training.lr", NAN), VALIDATE, "training.lr"),
    "lr huge": (setitem("training.lr", 1e9), VALIDATE, "training.lr"),
    "alpha inf": (setitem("adapter.alpha", INF), VALIDATE, "adapter.alpha"),
    "alpha nan": (setitem("adapter.alpha", NAN), VALIDATE, "adapter.alpha"),
    "kl_weight inf": (setitem("tasks.0.hiddenkey", {"kl_weight": INF}), VALIDATE, "hiddenkey.kl_weight"),
    "hidden_drop nan": (setitem("tasks.0.hiddenkey", {"hidden_drop": NAN}), VALIDATE, "hiddenkey.hidden_drop"),
    "keep_ratio nan": (setitem("tasks.1.gmt", {"keep_ratio": NAN}), VALIDATE, "gmt.keep_ratio"),
    "validation share nan": (setitem("tasks.0.data.validation", NAN), VALIDATE, "data.validation"),
    "test share inf": (setitem("tasks.0.data.test", INF), VALIDATE, "data.test"),
    "tau nan": (setitem("prior.tau", NAN), VALIDATE, "prior.tau"),
    "tau minus inf": (setitem("prior.tau", -INF), VALIDATE, "prior.tau"),
    "tau negative": (setitem("prior.tau", -3), VALIDATE, "prior.tau"),
    "tau word": (setitem("prior.tau", "lots"), VALIDATE, "prior.tau"),
    "seed negative": (setitem("training.seed", -1), VALIDATE, "training.seed"),
    "seed huge": (setitem("training.seed", 2**40), VALIDATE, "training.seed"),
    "batch size huge": (setitem("training.batch_size", 10**9), VALIDATE, "training.batch_size"),
    "steps zero": (setitem("training.steps", 0), VALIDATE, "training.steps"),
    "steps negative": (setitem("training.steps", -1), VALIDATE, "training.steps"),
    "steps huge": (setitem("training.steps", 10**12), VALIDATE, "training.steps"),
    "max_length huge": (setitem("training.max_length", 10**9), VALIDATE, "training.max_length"),
    "grad_accum zero": (setitem("training.grad_accum", 0), VALIDATE, "training.grad_accum"),
    "checkpoint_every zero": (setitem("training.checkpoint_every", 0), VALIDATE, "training.checkpoint_every"),
    "eval_docs zero": (setitem("training.eval_docs", 0), VALIDATE, "training.eval_docs"),
    "rank zero": (setitem("adapter.rank", 0), VALIDATE, "adapter.rank"),
    "rank huge": (setitem("adapter.rank", 10**6), VALIDATE, "adapter.rank"),
    "no target modules": (setitem("adapter.target_modules", []), VALIDATE, "adapter.target_modules"),
    "unknown adapter type": (setitem("tasks.1.adapter", {"type": "dora"}), VALIDATE, "unknown adapter type 'dora'"),
    "energy on lora": (setitem("tasks.1.adapter", {"energy": 0.9}), VALIDATE, "energy applies to adapter type"),
    "lr schedule": (setitem("training.lr_schedule", "linear"), VALIDATE, "training.lr_schedule"),
    "sampling": (setitem("training.sampling", "random"), VALIDATE, "training.sampling"),
    # task names are folders of the store
    "name hub.json": (setitem("tasks.0.name", "hub.json"), VALIDATE, "task name 'hub.json' is reserved"),
    "name global.safetensors": (setitem("tasks.0.name", "global.safetensors"), VALIDATE, "is reserved"),
    "name router.json": (setitem("tasks.0.name", "router.json"), VALIDATE, "is reserved"),
    "name router.safetensors": (setitem("tasks.0.name", "router.safetensors"), VALIDATE, "is reserved"),
    "name borahub.json": (setitem("tasks.0.name", "borahub.json"), VALIDATE, "is reserved"),
    "name README.md": (setitem("tasks.0.name", "ReadMe.md"), VALIDATE, "is reserved"),
    "name ending in a newline": (setitem("tasks.0.name", "cooking\n"), VALIDATE, "invalid task name"),
    "name traversal": (setitem("tasks.0.name", "../evil"), VALIDATE, "invalid task name"),
    "name absolute": (setitem("tasks.0.name", "/tmp/evil"), VALIDATE, "invalid task name"),
    "name with a slash": (setitem("tasks.0.name", "a/b"), VALIDATE, "invalid task name"),
    "name dot dot": (setitem("tasks.0.name", "a..b"), VALIDATE, "invalid task name"),
    "name empty": (setitem("tasks.0.name", ""), VALIDATE, "invalid task name"),
    "name too long": (setitem("tasks.0.name", "x" * 65), VALIDATE, "invalid task name"),
    "name a number": (setitem("tasks.0.name", 5), VALIDATE, "name: Input should be a valid string"),
    "duplicate names": (setitem("tasks.2.name", "cooking"), VALIDATE, "duplicate task name 'cooking'"),
    # data sources
    "hub id is a path": (setitem("tasks.0.data", {"hub": "../../etc"}), VALIDATE, "not a Hub dataset id"),
    "hub id absolute": (setitem("tasks.0.data", {"hub": "/etc/passwd"}), VALIDATE, "not a Hub dataset id"),
    "two sources": (setitem("tasks.0.data.bbc_news", "tech"), VALIDATE, "give exactly one of"),
    "no source": (setitem("tasks.0.data", {}), VALIDATE, "give exactly one of"),
    "unknown topic": (setitem("tasks.0.data", {"bbc_news": "weather"}), VALIDATE, "unknown BBC News topic"),
    "max_train zero": (setitem("tasks.0.data.max_train", 0), VALIDATE, "data.max_train"),
    "validation share too big": (setitem("tasks.0.data.validation", 0.7), VALIDATE, "data.validation"),
    "missing data file": (setitem("tasks.0.data.path", "nope.jsonl"), VALIDATE, "data file not found"),
    "prompt without completion": (setitem("tasks.0.prompt", "Q: {text}"), VALIDATE, "'prompt' and 'completion'"),
    # shape of the document
    "unknown top-level key": (setitem("bogus", 1), VALIDATE, "bogus: unknown key"),
    "unknown training key": (setitem("training.stpes", 3), VALIDATE, "training.stpes: unknown key"),
    "tasks not a list": (setitem("tasks", 5), VALIDATE, "tasks"),
    "task not a mapping": (setitem("tasks", [5]), VALIDATE, "tasks[0]"),
    "training not a mapping": (setitem("training", "fast"), VALIDATE, "training"),
    "root is a list": ("- a\n- b\n", VALIDATE, "expected a mapping"),
    "duplicate top-level key": ("store: a\nstore: b\n", VALIDATE, "duplicate key 'store'"),
    "duplicate nested key": ("training:\n  lr: 0.1\n  lr: 0.2\n", VALIDATE, "duplicate key 'lr'"),
    "nested 1000 deep": ("tasks: " + "[" * 1000 + "]" * 1000 + "\n", VALIDATE, "nested deeper than"),
    "not YAML": ("tasks: [unclosed\n", VALIDATE, "not valid YAML at line"),
    "binary": (b"\x00\xff\xfe\x01garbage", VALIDATE, "not UTF-8 text"),
    "UTF-16": ("store: x\n".encode("utf-16"), VALIDATE, "not UTF-8 text"),
    # caught when the data or the store is touched (train), still before anything is written
    "empty data file": (lambda c, root: (root / "cooking.jsonl").write_text(""), TRAIN, "cooking.jsonl is empty"),
    "data not JSON": (lambda c, root: (root / "cooking.jsonl").write_text('{"text": "a"}\n{bad\n'), TRAIN,
                      "cannot read cooking.jsonl"),
    "data column missing": (lambda c, root: (root / "cooking.jsonl").write_text('{"txt": "a b"}\n' * 5), TRAIN,
                            "column(s) text not in the data"),
    "too few examples": (lambda c, root: (root / "cooking.jsonl").write_text('{"text": "a b"}\n'), TRAIN,
                         "needs at least 3 non-empty examples"),
    "unsupported data type": (lambda c, root: ((root / "x.xml").write_text("<a/>"),
                                               c["tasks"][0]["data"].__setitem__("path", "x.xml")), TRAIN,
                              "unsupported file type '.xml'"),
    "store is a folder of the user's": (lambda c, root: ((root / "mydata").mkdir(),
                                                        (root / "mydata" / "precious.txt").write_text("keep"),
                                                        c.__setitem__("store", "mydata")), TRAIN,
                                        "holds no BoRA Hub store"),
    "store is a file": (lambda c, root: ((root / "notes.txt").write_text("keep"), c.__setitem__("store", "notes.txt")),
                        TRAIN, "exists and is not a folder"),
    "base model missing": (setitem("base_model", "/nonexistent/model"), TRAIN, "base_model '/nonexistent/model'"),
    # bad command lines
    "train steps -1": (None, ["train", "--steps", "-1"], "--steps: must be an integer >= 1"),
    "train steps 0": (None, ["train", "--steps", "0"], "--steps: must be an integer >= 1"),
    "train unknown task": (None, ["train", "--tasks", "nope", "--steps", "1"], "unknown task(s) nope"),
    "train tau nan": (None, ["train", "--tau", "nan"], "--tau: must be a number >= 0"),
    "eval max-docs -1": (None, ["eval", "--max-docs", "-1"], "--max-docs: must be an integer >= 1"),
    "generate temperature nan": (None, ["generate", "x", "--sample", "--temperature", "nan"], "--temperature"),
    "generate huge max-new-tokens": (None, ["generate", "x", "--max-new-tokens", "1000000000"], "--max-new-tokens"),
    "generate negative seed": (None, ["generate", "x", "--seed", "-5"], "--seed"),
    "config is a folder": (lambda c, root: (root / "conf.d").mkdir(), ["--config", "conf.d", "tasks", "validate"],
                           "not a file"),
    "config missing": (None, ["--config", "nope.yaml", "tasks", "validate"], "file not found"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_registry_or_command_is_one_line_exit_2_and_writes_nothing(case, tiny_registry, capsys, monkeypatch):
    change, argv, expected = CASES[case]
    root = tiny_registry.parent
    if isinstance(change, (str, bytes)):
        (tiny_registry.write_text if isinstance(change, str) else tiny_registry.write_bytes)(change)
    elif change is not None:
        cfg = yaml.safe_load(tiny_registry.read_text())
        try:
            change(cfg, root)
        except TypeError:
            change(cfg)
        tiny_registry.write_text(yaml.safe_dump(cfg, sort_keys=False))
    monkeypatch.chdir(root)
    before = checksums(root)
    if argv[0] != "--config":
        argv = ["--config", str(tiny_registry), *argv]
    assert_one_line_error(*run_cli(argv, capsys), expected)
    assert checksums(root) == before


def test_config_is_accepted_after_the_command(tiny_registry, capsys):
    assert main(["tasks", "validate", "--config", str(tiny_registry)]) == 0
    assert main(["tasks", "list", "--json", "--config", str(tiny_registry)]) == 0
    assert "OK (3 tasks" in capsys.readouterr().out
