"""Push and pull end to end: the real huggingface_hub client against the local Hub server (tests/hubserver.py).

One tiny hub is trained once for the module and pushed to a fresh repo; each test then pushes to or
pulls from that repo over HTTP. Every pull uses its own download cache: the test server's commit ids
are deterministic, so a cache shared across server instances could hold another run's files.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download
from safetensors.torch import load_file

from conftest import TOKEN, tiny_lm, tiny_tokenizer, write_tiny_registry
from hub import remote, store
from hub.card import build_card
from hub.cli import main
from hub.errors import RemoteError
from hub.workspace import Workspace

REAL_TOKEN, REAL_REPO = os.environ.get("HF_TOKEN"), os.environ.get("BORAHUB_TEST_REPO")  # read before any patching


def registry(root: Path, model_dir: Path) -> Path:
    """An empty registry on ``model_dir``."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "tasks.yaml"
    path.write_text(yaml.safe_dump({"base_model": str(model_dir), "store": "store", "tasks": []}))
    return path


def pull(server, cfg: Path, repo_id: str, **kw) -> remote.PullResult:
    return remote.pull(cfg, repo_id, token=TOKEN, endpoint=server.url, cache_dir=cfg.parent / "hf-cache", **kw)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def native(store_dir: Path, task: str) -> dict[str, torch.Tensor]:
    return load_file(str(store_dir / task / store.NATIVE_FILE))


def logits(ws: Workspace) -> dict[str, torch.Tensor]:
    """Each stored task's logits on the same two rows."""
    mtm, _ = ws.trained_model()
    ids = torch.tensor([[4, 9, 17, 25, 31, 40, 2, 2], [5, 6, 7, 8, 9, 10, 11, 12]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        out = {n: mtm(ids, mask, torch.full((2,), mtm.task_id(n))).logits for n in mtm.task_names}
        out["<base>"] = mtm(ids, mask, None).logits
    return out


def test_push_writes_store_manifest_and_card(server, api, pushed, origin):
    repo_id, result = pushed
    tasks = ["cooking", "finance", "sport"]
    files = set(api.list_repo_files(repo_id))
    per_task = {f"{t}/{f}" for t in tasks for f in (store.PEFT_CONFIG, store.PEFT_WEIGHTS, store.NATIVE_FILE)}
    manifest = json.loads(Path(hf_hub_download(repo_id, remote.MANIFEST, endpoint=server.url, token=TOKEN)).read_text())
    assert manifest["router"] == ["router.json", "router.safetensors"]  # written by `train` beside the adapters
    assert files == {".gitattributes", "README.md", remote.MANIFEST, store.HUB_FILE, store.GLOBAL_FILE, *per_task,
                     *manifest["router"]}
    assert sorted(result.uploaded) == sorted(files - {".gitattributes"})
    assert {t.name for t in api.list_repo_refs(repo_id).tags} == {"v1"}
    assert manifest["fingerprint"] == Workspace(origin).trained_model()[1]["fingerprint"]
    assert [t["name"] for t in manifest["tasks"]] == tasks
    assert manifest["groups"][0]["shapes"]["model.layers.0.self_attn.q_proj:A"] == [4, 64]
    assert manifest["tasks"][0]["spec"]["data"] == {"path": "cooking.jsonl"}

    card = ModelCard.load(repo_id, token=TOKEN)
    assert card.data.library_name == "peft"
    assert "borahub" in card.data.tags
    assert card.data.base_model is None  # a local folder is not a Hub id
    for t in manifest["tasks"]:
        assert t["perplexity"] < t["base_perplexity"]  # the adapters learned something
        assert f"| `{t['name']}` |" in card.text and f"{t['perplexity']:.2f}" in card.text


def test_card_names_a_hub_base_model(server, pushed):
    repo_id, _ = pushed
    manifest = json.loads(Path(hf_hub_download(repo_id, remote.MANIFEST, endpoint=server.url, token=TOKEN)).read_text())
    manifest["base_model"] = "HuggingFaceTB/SmolLM2-135M-Instruct"

    card = build_card(manifest, "me/news-hub")

    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert 'PeftModel.from_pretrained(base, "me/news-hub", subfolder="cooking")' in card.text


def test_push_again_uploads_nothing(server, api, pushed, origin):
    repo_id, first = pushed
    commits = [c.commit_id for c in api.list_repo_commits(repo_id)]
    n_requests = len(server.request_log)

    again = remote.push(origin, repo_id, token=TOKEN, endpoint=server.url)

    assert again.commit == first.commit and again.uploaded == [] and again.deleted == []
    assert [c.commit_id for c in api.list_repo_commits(repo_id)] == commits
    assert not [r for r in server.request_log[n_requests:] if r[0] == "POST" and "/commit/" in r[1]]


def test_pulled_adapters_give_the_pushed_logits(server, pushed, origin, tiny_model_dir, tmp_path):
    repo_id, result = pushed
    cfg = registry(tmp_path / "elsewhere", tiny_model_dir)

    got = pull(server, cfg, repo_id)

    assert got.commit == result.commit and got.tasks == ["cooking", "finance", "sport"]
    assert got.no_data == got.tasks  # their jsonl files are not beside this registry
    assert got.router == "pulled"
    assert tree_bytes(cfg.parent / "store")["router.json"] == (origin.parent / "store" / "router.json").read_bytes()
    before, after = logits(Workspace(origin)), logits(Workspace(cfg))
    for name in got.tasks:
        assert (before[name] - after[name]).abs().max() < 1e-6
        assert (before[name] - before["<base>"]).abs().max() > 1e-3  # adapters matter
    pulled_cfg = Workspace(cfg).cfg
    assert pulled_cfg.task_names == got.tasks and all(t.data is None for t in pulled_cfg.tasks)
    assert pulled_cfg.adapter_of(pulled_cfg.tasks[0]).rank == 4  # the pulled adapter, not the local default (8)


def test_pulled_task_loads_in_peft(server, pushed, origin, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    repo_id, _ = pushed
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, repo_id, subfolder="finance", token=TOKEN).eval()
    ids = torch.tensor([[4, 9, 17, 25, 31, 40, 2, 2], [5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        peft_logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert (peft_logits - logits(Workspace(origin))["finance"]).abs().max() < 1e-5


def test_branch_tag_and_subset_revisions(server, api, pushed, origin, tiny_model_dir, tmp_path):
    repo_id, first = pushed
    changed = tmp_path / "changed"
    shutil.copytree(origin.parent, changed, ignore=shutil.ignore_patterns("store-checkpoint"))
    Workspace(changed / "tasks.yaml").train(["sport"], steps=2, progress=False)  # only sport moves

    dev = remote.push(changed / "tasks.yaml", repo_id, revision="dev", evaluate=False, token=TOKEN, endpoint=server.url)
    subset = remote.push(origin, repo_id, revision="only-cooking", tasks=["cooking"], evaluate=False, token=TOKEN,
                         endpoint=server.url)

    assert "sport/native.safetensors" in dev.uploaded and not [f for f in dev.uploaded if f.startswith("cooking/")]
    assert "sport/native.safetensors" in subset.deleted and subset.tasks == ["cooking"]
    assert api.model_info(repo_id).sha == first.commit  # main did not move
    expect = {"main": origin.parent, "v1": origin.parent, "dev": changed, dev.commit: changed}
    for i, (rev, source) in enumerate(expect.items()):
        cfg = registry(tmp_path / f"pull-{i}", tiny_model_dir)
        got = pull(server, cfg, repo_id, revision=rev)
        for task in got.tasks:
            a, b = native(source / "store", task), native(cfg.parent / "store", task)
            assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(native(origin.parent / "store", "sport")["model.layers.0.self_attn.q_proj:B"],
                           native(changed / "store", "sport")["model.layers.0.self_attn.q_proj:B"])
    cfg = registry(tmp_path / "pull-subset", tiny_model_dir)
    assert pull(server, cfg, repo_id, revision="only-cooking").tasks == ["cooking"]
    assert Workspace(cfg).cfg.task_names == ["cooking"]


@pytest.fixture(scope="module")
def local_trained(tmp_path_factory, tiny_model_dir) -> Path:
    """A second trained hub with two of the three tasks (cooking, finance) and all three data files."""
    cfg = write_tiny_registry(tmp_path_factory.mktemp("local"), tiny_model_dir)
    raw = yaml.safe_load(cfg.read_text())
    raw["tasks"] = raw["tasks"][:2]
    raw["training"]["seed"] = 1
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    Workspace(cfg).train(progress=False)
    return cfg


@pytest.fixture
def local_hub(local_trained, tmp_path) -> Path:
    """A fresh copy of ``local_trained``: its tasks.yaml."""
    shutil.copytree(local_trained.parent, tmp_path / "local")
    return tmp_path / "local" / "tasks.yaml"


def test_pull_merges_into_a_store_with_other_tasks(server, pushed, origin, local_hub):
    repo_id, _ = pushed
    store_dir = local_hub.parent / "store"
    before = tree_bytes(store_dir)

    with pytest.raises(RemoteError, match="cooking, finance already registered here"):
        pull(server, local_hub, repo_id)
    assert tree_bytes(store_dir) == before
    got = pull(server, local_hub, repo_id, tasks=["sport"])

    # sport.jsonl exists here too, but a pulled spec never points at a file of this machine
    assert got.theta == {"lora-r4-a8-down_proj+q_proj+v_proj": "local"} and got.no_data == ["sport"]
    assert got.router == "local"
    for name in ("cooking", "finance", store.GLOBAL_FILE, "router."):  # local tasks, Theta and router untouched
        files = [k for k in before if k.startswith(name)]
        assert files and all((store_dir / k).read_bytes() == before[k] for k in files)
    merged = logits(Workspace(local_hub))
    assert (merged["sport"] - logits(Workspace(origin))["sport"]).abs().max() < 1e-6
    cfg = Workspace(local_hub).cfg
    assert cfg.task_names == ["cooking", "finance", "sport"] and cfg.task("sport").data is None
    state = store.read_state(store_dir)
    assert state["tasks"][2]["source"].startswith(f"{repo_id}@")

    forced = pull(server, local_hub, repo_id, force=True)
    assert forced.replaced == ["cooking", "finance", "sport"]
    assert forced.theta == {"lora-r4-a8-down_proj+q_proj+v_proj": "pulled"}  # no local task remains
    assert forced.router == "pulled"
    assert tree_bytes(store_dir)[store.GLOBAL_FILE] == (origin.parent / "store" / store.GLOBAL_FILE).read_bytes()


def _failing_pull(server, cfg: Path, repo_id: str, revision: str, capsys) -> str:
    """Pull the task 'sport' through the CLI; assert exit 2, one error line, and nothing changed locally."""
    before = tree_bytes(cfg.parent)
    code = main(["--config", str(cfg), "pull", repo_id, "--revision", revision, "--tasks", "sport"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert tree_bytes(cfg.parent) == before
    return err


def test_bad_pulls_change_nothing(server, api, pushed, origin, local_hub, tmp_path, capsys):
    repo_id, _ = pushed

    api.create_branch(repo_id, branch="truncated")
    server.truncate_file(repo_id, "sport/native.safetensors", 100, revision="truncated")
    err = _failing_pull(server, local_hub, repo_id, "truncated", capsys)
    assert "sport/native.safetensors has 100 bytes in the repo, borahub.json says" in err  # before downloading

    manifest = json.loads(Path(hf_hub_download(repo_id, remote.MANIFEST, endpoint=server.url, token=TOKEN)).read_text())
    manifest["groups"][0]["shapes"]["model.layers.1.mlp.down_proj:B"] = [64, 8]
    api.create_branch(repo_id, branch="bad-shape")
    api.upload_file(path_or_fileobj=json.dumps(manifest).encode(), path_in_repo=remote.MANIFEST, repo_id=repo_id,
                    revision="bad-shape")
    err = _failing_pull(server, local_hub, repo_id, "bad-shape", capsys)
    assert "down_proj:B has shape [64, 8]; the local base model needs [64, 4]" in err

    other_model = tmp_path / "other-model"
    tiny_lm(seed=1).save_pretrained(other_model)
    tiny_tokenizer().save_pretrained(other_model)
    (tmp_path / "other").mkdir()
    other = write_tiny_registry(tmp_path / "other", other_model)
    assert "was built for base model" in _failing_pull(server, other, repo_id, "main", capsys)

    assert "not found" in _failing_pull(server, local_hub, "tester/no-such-repo", "main", capsys)
    assert "revision 'nope' not found" in _failing_pull(server, local_hub, repo_id, "nope", capsys)


def test_cli_push_and_pull(server, api, origin, tiny_model_dir, tmp_path, capsys):
    repo_id = f"tester/cli-{uuid.uuid4().hex[:8]}"
    assert main(["--config", str(origin), "push", repo_id, "--private", "--no-eval", "--tasks", "finance,sport"]) == 0
    assert main(["--config", str(origin), "push", repo_id, "--no-eval", "--tasks", "finance,sport"]) == 0
    out = capsys.readouterr().out
    assert "pushed 2 task(s)" in out and "is up to date" in out
    assert api.model_info(repo_id).private is True

    cfg = tmp_path / "fresh" / "tasks.yaml"  # no registry yet: the pull creates one on the repo's base model
    assert main(["--config", str(cfg), "pull", repo_id, "--tasks", "sport"]) == 0
    assert "pulled 1 task(s)" in capsys.readouterr().out
    assert Workspace(cfg).cfg.task_names == ["sport"] and Workspace(cfg).cfg.base_model == str(tiny_model_dir)
    assert (tmp_path / "fresh" / ".borahub" / "store" / "sport" / store.PEFT_WEIGHTS).is_file()
    assert main(["--config", str(cfg), "pull", repo_id, "--tasks", "sport"]) == 2
    assert "already registered here (use --force" in capsys.readouterr().err


@pytest.mark.skipif(not (REAL_TOKEN and REAL_REPO), reason="set HF_TOKEN and BORAHUB_TEST_REPO to push to the real Hub")
def test_real_hub_round_trip(origin, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    endpoint, branch = "https://huggingface.co", f"test-{uuid.uuid4().hex[:8]}"
    remote.push(origin, REAL_REPO, revision=branch, private=True, token=REAL_TOKEN, endpoint=endpoint)
    try:
        cfg = registry(tmp_path / "real", tiny_model_dir)
        remote.pull(cfg, REAL_REPO, revision=branch, token=REAL_TOKEN, endpoint=endpoint, cache_dir=tmp_path / "cache")
        before, after = logits(Workspace(origin)), logits(Workspace(cfg))
        assert all((before[n] - after[n]).abs().max() < 1e-6 for n in ("cooking", "finance", "sport"))
    finally:
        HfApi(endpoint=endpoint, token=REAL_TOKEN).delete_branch(REAL_REPO, branch=branch)
