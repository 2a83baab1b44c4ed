"""A small in-memory Hugging Face Hub-compatible HTTP server for tests.

It implements the subset of the Hub API that the real ``huggingface_hub`` client uses
for *model* repositories: repo creation, commits (preupload, LFS batch/upload/verify and
the NDJSON commit endpoint), repo info, tree and paths info, commit history, branches, tags,
refs and file resolution (HEAD/GET ``/{repo_id}/resolve/{revision}/{path}``).

Usage::

    with HubServer() as url:
        with use_as_default_endpoint(url):
            HfApi(endpoint=url, token="hf_test").create_repo("user/model")

Storage is per server instance and lives in memory.  Every commit stores a full
snapshot of the repo's files; branches and tags point at commit shas (40 hex chars).
Files are stored either as regular git blobs or as LFS objects.  The preupload endpoint
picks LFS for paths matching an ``filter=lfs`` rule of the repo's ``.gitattributes``
(created with common weight extensions by ``create_repo``), for binary content and for
files over 10 MiB.  Authentication is not checked and ``.gitignore`` is not honoured.
Only the standard library is used.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
DEFAULT_LFS_PATTERNS = "*.bin *.ckpt *.gguf *.h5 *.msgpack *.npy *.npz *.onnx *.pkl *.pt *.pth *.safetensors".split()
LFS_BATCH_PATH = ["info", "lfs", "objects", "batch"]  # after "{namespace}/{name}.git/"
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in DEFAULT_LFS_PATTERNS).encode()


def git_blob_oid(data: bytes) -> str:
    """Git object id of a blob (sha1 of ``blob <len>\\0<data>``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class _Blob:
    """A stored file: its bytes and how git would store them (regular blob or LFS)."""

    data: bytes
    lfs: bool

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @cached_property
    def pointer(self) -> bytes:
        """The git-lfs pointer file that git stores in place of an LFS file."""
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        ).encode()

    @cached_property
    def oid(self) -> str:
        """Git blob id: of the content for regular files, of the pointer file for LFS files."""
        return git_blob_oid(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        """What ``/resolve`` advertises as ETag (as huggingface.co does): sha256 for LFS, git oid otherwise."""
        return self.sha256 if self.lfs else self.oid

    def tree_entry(self, path: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.oid, "size": len(self.data), "path": path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(self.pointer)}
        return entry


@dataclass
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, _Blob]


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> _Commit:
        """Commit for a branch name, tag name or full commit sha (404 RevisionNotFound otherwise)."""
        oid = self.branches.get(revision) or self.tags.get(revision) or revision
        if oid not in self.commits:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]


class _HttpError(Exception):
    """An error response; ``code`` goes to the ``X-Error-Code`` header the client dispatches on."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(payload: Any, status: int = 200) -> _Response:
    return _Response(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class _Hub:
    """The server state and the endpoint logic, independent of HTTP parsing."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.url = ""
        self.repos: dict[str, _Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, shared by all repos
        self.request_log: list[tuple[str, str]] = []
        self._counter = itertools.count()

    # -- state helpers ------------------------------------------------------------------------

    def repo(self, repo_id: str) -> _Repo:
        if repo_id not in self.repos:
            raise _HttpError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return self.repos[repo_id]

    def commit(self, repo: _Repo, branch: str, title: str, files: dict[str, _Blob], message: str = "") -> _Commit:
        """Record a commit with the full snapshot ``files`` on top of ``branch`` and move the branch."""
        parent = repo.branches.get(branch)
        seed = json.dumps([repo.repo_id, parent, title, next(self._counter)])
        commit = _Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, title, message, _now(), files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    # -- /api endpoints -----------------------------------------------------------------------

    def api_create_repo(self, body: dict) -> _Response:
        if body.get("type", "model") != "model":
            raise _HttpError(400, "This test server only supports model repos")
        if not body.get("organization"):
            raise _HttpError(400, "Use a namespaced repo id ('namespace/name')")
        repo_id = f"{body['organization']}/{body['name']}"
        private = body.get("visibility", "private" if body.get("private") else "public") != "public"
        payload = {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}
        if repo_id in self.repos:  # the client reads "url" from this 409 too when exist_ok=True
            return _json({**payload, "error": f"You already created this model repo: {repo_id}"}, 409)
        repo = self.repos[repo_id] = _Repo(repo_id, private, _now())
        self.commit(repo, "main", "initial commit", {".gitattributes": _Blob(GITATTRIBUTES, lfs=False)})
        return _json(payload)

    def api_model_info(self, repo: _Repo, revision: str, query: dict[str, list[str]]) -> _Response:
        commit = repo.resolve(revision)
        with_blobs = query.get("blobs", ["False"])[0].lower() == "true"
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=len(blob.data), blobId=blob.oid)
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
            siblings.append(sibling)
        info = dict(id=repo.repo_id, modelId=repo.repo_id, author=repo.repo_id.split("/")[0], sha=commit.oid)
        info.update(lastModified=commit.date, createdAt=repo.created_at, private=repo.private, gated=False)
        return _json({**info, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings})

    def api_tree(self, repo: _Repo, revision: str, path: str, query: dict[str, list[str]]) -> _Response:
        files = repo.resolve(revision).files
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        prefix = f"{path}/" if path else ""
        below = {p: blob for p, blob in files.items() if p.startswith(prefix)}
        if path and not below:
            raise _HttpError(404, f"Directory not found: {path}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for file_path, blob in below.items():
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                directory = prefix + "/".join(parts[:depth])
                entries[directory] = self._dir_entry(files, directory)
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                entries[file_path] = blob.tree_entry(file_path)
        return _json([entries[p] for p in sorted(entries)])

    def api_paths_info(self, repo: _Repo, revision: str, paths: list[str]) -> _Response:
        files = repo.resolve(revision).files
        found = []
        for path in (p.strip("/") for p in paths):
            if path in files:
                found.append(files[path].tree_entry(path))
            elif any(p.startswith(f"{path}/") for p in files):
                found.append(self._dir_entry(files, path))
        return _json(found)

    @staticmethod
    def _dir_entry(files: dict[str, _Blob], directory: str) -> dict[str, Any]:
        listing = sorted((p, b.oid) for p, b in files.items() if p.startswith(f"{directory}/"))
        oid = hashlib.sha1(json.dumps(listing).encode()).hexdigest()
        return {"type": "directory", "oid": oid, "size": 0, "path": directory}

    def api_refs(self, repo: _Repo) -> _Response:
        def refs(names: dict[str, str], kind: str) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": oid} for n, oid in sorted(names.items())]

        branches, tags = refs(repo.branches, "heads"), refs(repo.tags, "tags")
        return _json({"branches": branches, "tags": tags, "converts": [], "pullRequests": []})

    def api_commits(self, repo: _Repo, revision: str) -> _Response:
        history = []
        oid: str | None = repo.resolve(revision).oid
        while oid is not None:
            commit = repo.commits[oid]
            history.append(dict(id=oid, title=commit.title, message=commit.message, date=commit.date, authors=[]))
            oid = commit.parent
        return _json(history)

    def api_create_branch(self, repo: _Repo, branch: str, body: dict) -> _Response:
        if branch in repo.branches:
            raise _HttpError(409, f"Branch already exists: {branch}")
        repo.branches[branch] = repo.resolve(body.get("startingPoint", "main")).oid
        return _json({})

    def api_create_tag(self, repo: _Repo, revision: str, body: dict) -> _Response:
        if body["tag"] in repo.tags:
            raise _HttpError(409, f"Tag already exists: {body['tag']}")
        repo.tags[body["tag"]] = repo.resolve(revision).oid
        return _json({})

    def api_preupload(self, repo: _Repo, revision: str, body: dict) -> _Response:
        commit = repo.resolve(revision)
        files = commit.files
        attributes = files[".gitattributes"].data.decode() if ".gitattributes" in files else ""
        lfs_patterns = [line.split()[0] for line in attributes.splitlines() if "filter=lfs" in line.split()[1:]]
        result = []
        for item in body["files"]:
            path, size, sample = item["path"], item["size"], base64.b64decode(item["sample"])
            tracked = any(fnmatch.fnmatch(path if "/" in pat else path.rsplit("/", 1)[-1], pat) for pat in lfs_patterns)
            lfs = tracked or size > LFS_SIZE_THRESHOLD or b"\0" in sample
            remote = files.get(path)
            # The client compares this oid with sha256 (lfs) or the git blob oid (regular) of the local file.
            oid = None if remote is None else (remote.sha256 if lfs else remote.oid)
            result.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return _json({"files": result, "commitOid": commit.oid})

    def api_commit(self, repo: _Repo, branch: str, lines: list[dict], query: dict[str, list[str]]) -> _Response:
        if query.get("create_pr"):
            raise _HttpError(400, "create_pr is not supported by this test server")
        if branch not in repo.branches:
            raise _HttpError(404, f"Invalid rev id: {branch} is not a branch", "RevisionNotFound")
        head = repo.resolve(branch)
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        parent = header.get("parentCommit")
        if parent and not head.oid.startswith(parent):
            raise _HttpError(412, f"A commit has happened since {parent}. Please refresh and try again.")
        files = dict(head.files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = _Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    raise _HttpError(422, f"LFS object {value['oid']} was not uploaded")
                files[value["path"]] = _Blob(self.lfs_objects[value["oid"]], lfs=True)
            elif key in ("deletedFile", "deletedFolder"):
                path = value["path"].rstrip("/")
                doomed = [p for p in files if p == path or (key == "deletedFolder" and p.startswith(f"{path}/"))]
                if not doomed:
                    raise _HttpError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                for p in doomed:
                    del files[p]
        commit = self.commit(repo, branch, header.get("summary") or "Commit", files, header.get("description", ""))
        commit_url = f"{self.url}/{repo.repo_id}/commit/{commit.oid}"
        return _json({"success": True, "commitOid": commit.oid, "commitUrl": commit_url, "pullRequestUrl": None})

    # -- git-lfs endpoints ----------------------------------------------------------------------

    def lfs_batch(self, body: dict) -> _Response:
        objects = []
        for obj in body["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs_objects:  # no "actions" tells the client the object is already stored
                href = f"{self.url}/__lfs/{obj['oid']}"
                entry["actions"] = {"upload": {"href": href}, "verify": {"href": f"{href}/verify"}}
            objects.append(entry)
        return _json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_upload(self, oid: str, data: bytes) -> _Response:
        if hashlib.sha256(data).hexdigest() != oid:
            raise _HttpError(400, f"Uploaded content does not match sha256 {oid}")
        self.lfs_objects[oid] = data
        return _Response(200)

    def lfs_verify(self, oid: str, body: dict) -> _Response:
        if oid not in self.lfs_objects or len(self.lfs_objects[oid]) != body["size"]:
            raise _HttpError(404, f"LFS object {oid} missing or of the wrong size")
        return _json({"success": True})

    # -- downloads --------------------------------------------------------------------------------

    def resolve_file(self, repo: _Repo, revision: str, path: str) -> _Response:
        commit = repo.resolve(revision)
        blob = commit.files.get(path)
        if blob is None:
            raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{blob.etag}"', "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.etag}"', "X-Linked-Size": str(len(blob.data))})
        return _Response(200, blob.data, headers)


class _Handler(BaseHTTPRequestHandler):
    """Parses requests, routes them to :class:`_Hub` and writes the responses."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_POST = do_PUT = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request stderr logging."""

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))  # the client never sends chunked bodies
        hub = self.server.hub
        try:
            with hub.lock:
                hub.request_log.append((self.command, urlsplit(self.path).path))
                response = self._route(hub, body)
        except _HttpError as err:
            response = _json({"error": err.message}, err.status)
            response.headers.update(err.headers)
            response.headers["X-Error-Message"] = err.message.encode("ascii", "backslashreplace").decode()
            if err.code:
                response.headers["X-Error-Code"] = err.code
        except Exception as err:  # report bugs of this server to the client instead of hanging up
            response = _json({"error": f"{type(err).__name__}: {err}"}, 500)
        self.send_response(response.status)
        for name, value in {**response.headers, "Content-Length": str(len(response.body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def _route(self, hub: _Hub, body: bytes) -> _Response:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        method = self.command

        def json_body() -> dict:
            return json.loads(body or b"{}")

        if method == "POST" and parts == ["api", "repos", "create"]:
            return hub.api_create_repo(json_body())
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return _json({"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo, action, args = hub.repo("/".join(parts[2:4])), parts[4] if len(parts) > 4 else "", parts[5:]
            if method == "GET" and action == "":
                return hub.api_model_info(repo, "main", query)
            if method == "GET" and action == "revision" and len(args) == 1:
                return hub.api_model_info(repo, args[0], query)
            if method == "GET" and action == "tree" and args:
                return hub.api_tree(repo, args[0], "/".join(args[1:]).strip("/"), query)
            if method == "POST" and action == "paths-info" and len(args) == 1:
                form = json_body() if body.startswith(b"{") else parse_qs(body.decode())
                return hub.api_paths_info(repo, args[0], form.get("paths", []))
            if method == "GET" and action == "commits" and len(args) == 1:
                return hub.api_commits(repo, args[0])
            if method == "GET" and action == "refs":
                return hub.api_refs(repo)
            if method == "POST" and action == "branch" and len(args) == 1:
                return hub.api_create_branch(repo, args[0], json_body())
            if method == "POST" and action == "tag" and len(args) == 1:
                return hub.api_create_tag(repo, args[0], json_body())
            if method == "POST" and action == "preupload" and len(args) == 1:
                return hub.api_preupload(repo, args[0], json_body())
            if method == "POST" and action == "commit" and len(args) == 1:
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                return hub.api_commit(repo, args[0], lines, query)
        if method == "POST" and parts[2:] == LFS_BATCH_PATH and parts[1].endswith(".git"):
            hub.repo(f"{parts[0]}/{parts[1][: -len('.git')]}")
            return hub.lfs_batch(json_body())
        if method == "PUT" and len(parts) == 2 and parts[0] == "__lfs":
            return hub.lfs_upload(parts[1], body)
        if method == "POST" and len(parts) == 3 and parts[0] == "__lfs" and parts[2] == "verify":
            return hub.lfs_verify(parts[1], json_body())
        if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
            return hub.resolve_file(hub.repo("/".join(parts[:2])), parts[3], "/".join(parts[4:]))
        raise _HttpError(404, f"No route for {method} {url.path}")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: _Hub

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore connection errors (clients hanging up) instead of printing tracebacks."""


class HubServer:
    """A Hub-compatible server on ``127.0.0.1`` and an ephemeral port, run in a background thread.

    ``with HubServer() as url:`` starts it and yields the endpoint url; ``start()``/``stop()``
    do the same explicitly.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._address = (host, port)
        self._hub = _Hub()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Bind, serve in a daemon thread and return the endpoint url (e.g. ``http://127.0.0.1:54321``)."""
        if self._server is not None:
            raise RuntimeError("HubServer already started")
        self._server = _Server(self._address, _Handler)
        self._server.hub = self._hub
        host, port = self._server.server_address[:2]
        self._hub.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="HubServer", daemon=True)
        self._thread.start()
        return self._hub.url

    def stop(self) -> None:
        """Stop serving and close the socket.  The stored repos are kept (a restart serves them again)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = self._thread = None

    @property
    def url(self) -> str:
        """The endpoint url to pass as ``HF_ENDPOINT`` / ``endpoint=``."""
        if self._server is None:
            raise RuntimeError("HubServer is not running")
        return self._hub.url

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def request_log(self) -> list[tuple[str, str]]:
        """``(method, url path)`` of every request received so far, oldest first."""
        with self._hub.lock:
            return list(self._hub.request_log)

    def truncate_file(self, repo_id: str, path: str, nbytes: int, revision: str = "main") -> str:
        """Corrupt a file: commit its first ``nbytes`` bytes in place of it on branch ``revision``.

        The file keeps its storage kind (LFS or regular), and everything the server advertises
        afterwards (size, ETag, git oid, LFS sha256, ``X-Linked-Size``) describes the truncated
        bytes, exactly as if a client had uploaded them.  Returns the new commit sha.
        """
        with self._hub.lock:
            repo = self._hub.repo(repo_id)
            if revision not in repo.branches:
                raise ValueError(f"{revision!r} is not a branch of {repo_id}")
            files = dict(repo.resolve(revision).files)
            if path not in files:
                raise KeyError(f"{path!r} not found in {repo_id}@{revision}")
            files[path] = _Blob(files[path].data[:nbytes], files[path].lfs)
            return self._hub.commit(repo, revision, f"Truncate {path} to {nbytes} bytes", files).oid


@contextlib.contextmanager
def use_as_default_endpoint(url: str) -> Iterator[None]:
    """Point an already imported ``huggingface_hub`` at ``url`` and disable Xet, restoring everything on exit.

    ``HF_ENDPOINT`` and ``HF_HUB_DISABLE_XET`` are read when ``huggingface_hub`` is imported, and
    helpers without an ``endpoint`` argument (``ModelCard.load``/``push_to_hub``: ``hf_hub_download``
    without endpoint, the module-level ``upload_file``, card validation) use the values captured
    then.  This patches ``constants.ENDPOINT``, ``constants.HUGGINGFACE_CO_URL_TEMPLATE``,
    ``constants.HF_HUB_DISABLE_XET`` and the endpoint of the module-level default ``HfApi``, and sets
    both environment variables for child processes.
    """
    from huggingface_hub import constants, hf_api

    patches = [
        (constants, "ENDPOINT", url),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"),
        (constants, "HF_HUB_DISABLE_XET", True),
        (hf_api.api, "endpoint", url),
    ]
    saved_attrs = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    saved_env = {name: os.environ.get(name) for name in ("HF_ENDPOINT", "HF_HUB_DISABLE_XET")}
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        os.environ.update(HF_ENDPOINT=url, HF_HUB_DISABLE_XET="1")
        yield
    finally:
        for obj, name, value in saved_attrs:
            setattr(obj, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
