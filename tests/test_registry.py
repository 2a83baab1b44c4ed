"""tasks.yaml validation, `borahub tasks validate|list|add`, data sources and splits."""
from __future__ import annotations

import json

import pytest
import yaml

from hub.cli import main
from tasks.data import load_task, split
from tasks.schema import DataSpec, TaskSpec


def files_snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def mutate(path, fn):
    cfg = yaml.safe_load(path.read_text())
    fn(cfg)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


CASES = {
    "missing key": (lambda c: c["tasks"][0].pop("name"), "tasks[0].name: Field required"),
    "wrong type": (lambda c: c["training"].__setitem__("steps", "many"), "training.steps"),
    "unknown adapter type": (lambda c: c["tasks"][1].__setitem__("adapter", {"type": "dora"}),
                             "tasks[1](finance).adapter.type: unknown adapter type 'dora'"),
    "duplicate task names": (lambda c: c["tasks"][2].__setitem__("name", "cooking"),
                             "tasks[2].name: duplicate task name 'cooking'"),
    "missing data file": (lambda c: c["tasks"][0]["data"].__setitem__("path", "nope.jsonl"),
                          "tasks[0](cooking).data.path: data file not found: nope.jsonl"),
    "bad tau": (lambda c: c["prior"].__setitem__("tau", -3),
                "prior.tau: must be a number >= 0, 'shared', 'auto' or 'search'"),
    "unknown key": (lambda c: c.__setitem__("bogus", 1), "bogus: unknown key"),
    "energy on lora": (lambda c: c["tasks"][1].__setitem__("adapter", {"type": "lora", "energy": 0.9}),
                       "tasks[1](finance).adapter: energy applies to adapter type 'svfit' only"),
    "unknown lr schedule": (lambda c: c["training"].__setitem__("lr_schedule", "linear"), "training.lr_schedule"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_registry_exits_2_naming_the_key(case, tiny_registry, capsys):
    fn, expected = CASES[case]
    mutate(tiny_registry, fn)
    before = files_snapshot(tiny_registry.parent)
    code, out, err = run(capsys, "--config", str(tiny_registry), "tasks", "validate")
    assert code == 2
    assert expected in err, err
    assert "Traceback" not in err
    assert files_snapshot(tiny_registry.parent) == before


def test_every_error_is_reported_at_once(tiny_registry, capsys):
    mutate(tiny_registry, lambda c: (CASES["bad tau"][0](c), CASES["unknown adapter type"][0](c),
                                     CASES["missing data file"][0](c)))
    code, _, err = run(capsys, "--config", str(tiny_registry), "tasks", "validate")
    assert code == 2 and len(err.strip().splitlines()) == 3


def test_valid_registry_lists_tasks(tiny_registry, capsys):
    assert run(capsys, "--config", str(tiny_registry), "tasks", "validate")[0] == 0
    code, out, _ = run(capsys, "--config", str(tiny_registry), "tasks", "list", "--json")
    assert code == 0 and [t["name"] for t in json.loads(out)] == ["cooking", "finance", "sport"]


def test_not_yaml_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "tasks.yaml"
    bad.write_text("tasks: [unclosed\n")
    code, _, err = run(capsys, "--config", str(bad), "tasks", "validate")
    assert code == 2 and "not valid YAML at line" in err and len(err.strip().splitlines()) == 1


def test_fragment_not_yaml_is_a_one_line_error_naming_it(tiny_registry, capsys):
    before = tiny_registry.read_text()
    frag = tiny_registry.parent / "frag.yaml"
    frag.write_text("tasks:\n  - {name: x\n")
    code, _, err = run(capsys, "--config", str(tiny_registry), "tasks", "add", str(frag))
    assert code == 2 and "frag.yaml" in err and "not valid YAML at line" in err and len(err.strip().splitlines()) == 1
    assert tiny_registry.read_text() == before


def test_tasks_add_registers_or_writes_nothing(tiny_registry, capsys):
    root = tiny_registry.parent
    frag = root / "new.yaml"
    frag.write_text(yaml.safe_dump({"tasks": [{"name": "cooking", "data": {"path": "cooking.jsonl"}}]}))
    before = files_snapshot(root)
    code, _, err = run(capsys, "--config", str(tiny_registry), "tasks", "add", str(frag))
    assert code == 2 and "duplicate task name 'cooking'" in err
    assert files_snapshot(root) == before

    sub = root / "more"
    sub.mkdir()
    (sub / "poems.txt").write_text("roses are red\nviolets are blue\nsugar is sweet\nand so are you\n")
    frag.write_text(yaml.safe_dump([{"name": "poems", "data": {"path": "poems.txt"}}]))
    (sub / "frag.yaml").write_text(frag.read_text())
    code, out, _ = run(capsys, "--config", str(tiny_registry), "tasks", "add", str(sub / "frag.yaml"))
    assert code == 0 and "poems" in out
    cfg = yaml.safe_load(tiny_registry.read_text())
    assert cfg["tasks"][-1] == {"name": "poems", "data": {"path": "more/poems.txt"}}  # relative to the registry
    assert len(load_task(TaskSpec.model_validate(cfg["tasks"][-1]), root).train) >= 1


def test_tasks_add_keeps_the_registry_comments(tiny_registry, capsys):
    root = tiny_registry.parent
    text = "# my hub\n" + tiny_registry.read_text().replace("tasks:", "tasks:  # one adapter each", 1)
    tiny_registry.write_text(text)
    (root / "poems.txt").write_text("roses are red\nviolets are blue\n")
    frag = root / "frag.yaml"
    frag.write_text(yaml.safe_dump([{"name": "poems", "data": {"path": "poems.txt"}}]))
    code, _, _ = run(capsys, "--config", str(tiny_registry), "tasks", "add", str(frag))
    after = tiny_registry.read_text()
    assert code == 0 and after.startswith(text) and "# one adapter each" in after  # appended, nothing rewritten
    assert yaml.safe_load(after)["tasks"][-1] == {"name": "poems", "data": {"path": "poems.txt"}}


def test_split_is_deterministic_and_disjoint():
    spec = DataSpec(path="x", validation=0.1, test=0.2, max_train=50)
    a, b = split(100, spec, "t", 0), split(100, spec, "t", 0)
    assert all((x == y).all() for x, y in zip(a, b))
    train, val, test = a
    assert len(test) == 20 and len(val) == 10 and len(train) == 50
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert not all((x == y).all() for x, y in zip(a, split(100, spec, "other", 0)))  # per-task order


def test_sources_and_prompt_completion(tmp_path):
    (tmp_path / "d.csv").write_text("q,a\n" + "".join(f"question {i},answer {i}\n" for i in range(10)))
    t = TaskSpec(name="qa", data={"path": "d.csv"}, prompt="Q: {q}\nA: ", completion="{a}")
    data = load_task(t, tmp_path)
    ex = (data.train + data.validation + data.test)[0]
    assert ex.prompt.startswith("Q: question") and ex.completion.startswith("answer")
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.txt").write_bytes(f"doc {i} caf\xe9".encode("latin-1"))  # non-UTF-8 bytes are replaced
    d = load_task(TaskSpec(name="f", data={"path": "docs"}), tmp_path)
    assert len(d.train + d.validation + d.test) == 4
    with pytest.raises(Exception, match="column"):
        load_task(TaskSpec(name="bad", data={"path": "d.csv"}, template="{missing}"), tmp_path)


def test_bbc_news_source_reads_the_package():
    d = load_task(TaskSpec(name="tech", data={"bbc_news": "tech", "max_train": 5}), ".")
    assert len(d.train) == 5 and len(d.test) > 20
