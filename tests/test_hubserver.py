"""Tests of the local Hub server (tests/hubserver.py) driven by the real huggingface_hub client.

Other test modules may import huggingface_hub before this one, so ``HF_ENDPOINT`` cannot be relied
upon: ``HfApi`` and the download functions get ``endpoint=`` explicitly, and the module-scoped
fixture wraps everything in :func:`use_as_default_endpoint`, which disables Xet uploads and points
the endpoint-less helpers (``ModelCard.load`` / ``ModelCard.push_to_hub``) at the server.
"""

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from hubserver import HubServer, git_blob_oid, use_as_default_endpoint

TOKEN = "hf_test"
README = "---\nlicense: apache-2.0\ntags:\n- bora\n---\n# Test adapter\n"


@pytest.fixture(scope="module")
def server():
    hub = HubServer()
    with hub as url, use_as_default_endpoint(url):
        yield hub


@pytest.fixture(scope="module")
def api(server):
    return HfApi(endpoint=server.url, token=TOKEN)


@pytest.fixture
def folder(tmp_path) -> Path:
    """A small adapter-like folder: a safetensors file, json files (one nested) and a README."""
    root = tmp_path / "upload"
    (root / "tasks").mkdir(parents=True)
    save_file({"lora_A": np.arange(64, dtype=np.float32).reshape(8, 8)}, str(root / "adapter.safetensors"))
    (root / "adapter_config.json").write_text(json.dumps({"r": 8, "alpha": 16}))
    (root / "tasks" / "sst2.json").write_text(json.dumps({"task": "sst2"}))
    (root / "README.md").write_text(README)
    return root


@pytest.fixture
def repo_id(api, folder) -> str:
    """A fresh repo whose main branch holds the contents of ``folder``."""
    repo_id = api.create_repo(f"tester/model-{uuid.uuid4().hex[:8]}").repo_id
    api.upload_folder(repo_id=repo_id, folder_path=folder)
    return repo_id


def download(server, repo_id, filename, cache_dir, revision=None) -> bytes:
    path = hf_hub_download(
        repo_id, filename, revision=revision, cache_dir=cache_dir, endpoint=server.url, token=TOKEN
    )
    return Path(path).read_bytes()


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_create_repo(api):
    url = api.create_repo("tester/created", private=True)
    assert url.repo_id == "tester/created"
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("tester/created")
    assert excinfo.value.response.status_code == 409
    api.create_repo("tester/created", exist_ok=True)
    info = api.model_info("tester/created")
    assert info.private is True
    assert len(info.sha) == 40
    assert [s.rfilename for s in info.siblings] == [".gitattributes"]


def test_upload_folder_and_snapshot_download(server, api, folder, tmp_path):
    repo_id = api.create_repo("tester/snapshot").repo_id
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder)
    weights_sha256 = hashlib.sha256((folder / "adapter.safetensors").read_bytes()).hexdigest()
    assert ("PUT", f"/__lfs/{weights_sha256}") in server.request_log  # uploaded through the LFS protocol

    info = api.model_info(repo_id, files_metadata=True)
    assert info.sha == commit.oid
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", *local_files(folder)}
    assert siblings["adapter.safetensors"].lfs is not None
    assert siblings["adapter_config.json"].lfs is None

    snapshot = Path(snapshot_download(repo_id, cache_dir=tmp_path / "cache", endpoint=server.url, token=TOKEN))
    assert snapshot.name == commit.oid
    for name, content in local_files(folder).items():
        assert (snapshot / name).read_bytes() == content
    assert load_file(str(snapshot / "adapter.safetensors"))["lora_A"].shape == (8, 8)


def test_reupload_of_unchanged_folder_is_detected(server, api, repo_id, folder):
    history = api.list_repo_commits(repo_id)
    n_requests = len(server.request_log)

    commit = api.upload_folder(repo_id=repo_id, folder_path=folder)

    # The client compared the preupload oids with its local files and skipped the commit.
    assert commit.oid == history[0].commit_id
    assert [c.commit_id for c in api.list_repo_commits(repo_id)] == [c.commit_id for c in history]
    assert [c.title for c in history] == ["Upload folder using huggingface_hub", "initial commit"]
    assert not [r for r in server.request_log[n_requests:] if r[0] == "POST" and "/commit/" in r[1]]
    # The tree exposes the same information: git blob oid for regular files, sha256 for LFS files.
    remote = {f.path: f for f in api.list_repo_tree(repo_id, recursive=True) if hasattr(f, "blob_id")}
    for name, content in local_files(folder).items():
        if remote[name].lfs is not None:
            assert remote[name].lfs.sha256 == hashlib.sha256(content).hexdigest()
        else:
            assert remote[name].blob_id == git_blob_oid(content)
        assert remote[name].size == len(content)
    [info] = api.get_paths_info(repo_id, ["adapter.safetensors"])
    assert info.lfs.size == len(local_files(folder)["adapter.safetensors"])


def test_list_repo_tree_non_recursive(api, repo_id):
    entries = {f.path: type(f).__name__ for f in api.list_repo_tree(repo_id)}
    assert entries["tasks"] == "RepoFolder"
    assert "tasks/sst2.json" not in entries
    assert [f.path for f in api.list_repo_tree(repo_id, path_in_repo="tasks")] == ["tasks/sst2.json"]


def test_tag_pins_content(server, api, repo_id, tmp_path):
    api.create_tag(repo_id, tag="v1")
    api.upload_file(path_or_fileobj=b'{"r": 4}', path_in_repo="adapter_config.json", repo_id=repo_id)

    assert download(server, repo_id, "adapter_config.json", tmp_path, revision="v1") == b'{"r": 8, "alpha": 16}'
    assert download(server, repo_id, "adapter_config.json", tmp_path) == b'{"r": 4}'


def test_branch_upload_and_refs(server, api, repo_id, folder, tmp_path):
    api.create_branch(repo_id, branch="dev")
    (folder / "tasks" / "sst2.json").write_text('{"task": "sst2", "epochs": 3}')
    dev_commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision="dev")
    api.create_tag(repo_id, tag="dev-1", revision="dev")

    assert download(server, repo_id, "tasks/sst2.json", tmp_path) == b'{"task": "sst2"}'
    assert download(server, repo_id, "tasks/sst2.json", tmp_path, revision="dev") == b'{"task": "sst2", "epochs": 3}'
    assert download(server, repo_id, "tasks/sst2.json", tmp_path, revision=dev_commit.oid).endswith(b"3}")

    refs = api.list_repo_refs(repo_id)
    branches = {b.name: b.target_commit for b in refs.branches}
    assert branches["dev"] == dev_commit.oid != branches["main"]
    assert {t.name: t.target_commit for t in refs.tags} == {"dev-1": dev_commit.oid}
    assert api.model_info(repo_id, revision="dev").sha == dev_commit.oid


def test_model_card_round_trip(api, repo_id):
    card = ModelCard(README.replace("# Test adapter", "# Pushed card"))
    card.push_to_hub(repo_id, token=TOKEN)

    loaded = ModelCard.load(repo_id, token=TOKEN)
    assert loaded.data.tags == ["bora"]
    assert "# Pushed card" in loaded.text


def test_missing_entry_revision_and_repo(server, repo_id, tmp_path):
    with pytest.raises(EntryNotFoundError):
        download(server, repo_id, "missing.json", tmp_path)
    with pytest.raises(RevisionNotFoundError):
        download(server, repo_id, "README.md", tmp_path, revision="no-such-branch")
    with pytest.raises(RepositoryNotFoundError):
        download(server, "tester/no-such-repo", "README.md", tmp_path)


def test_commit_with_stale_parent_is_rejected(api, repo_id):
    parent = api.model_info(repo_id).sha
    api.create_commit(repo_id, [CommitOperationDelete("tasks/")], commit_message="drop tasks", parent_commit=parent)
    assert "tasks/sst2.json" not in api.list_repo_files(repo_id)

    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_commit(repo_id, [CommitOperationAdd("x.txt", b"x")], commit_message="x", parent_commit=parent)
    assert excinfo.value.response.status_code == 412


def test_truncate_file(server, api, repo_id, tmp_path):
    commit = server.truncate_file(repo_id, "adapter.safetensors", 10)

    [info] = api.get_paths_info(repo_id, ["adapter.safetensors"])
    assert info.size == 10
    truncated = download(server, repo_id, "adapter.safetensors", tmp_path)
    assert len(truncated) == 10
    assert info.lfs.sha256 == hashlib.sha256(truncated).hexdigest()
    assert api.model_info(repo_id).sha == commit
    with pytest.raises(SafetensorError):
        load_file(hf_hub_download(repo_id, "adapter.safetensors", cache_dir=tmp_path, endpoint=server.url))
