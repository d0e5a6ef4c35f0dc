"""The Hub, tested for real and offline: plans pushed and loaded back through huggingface_hub's own code paths.

A loopback Hub server (below) answers the API calls huggingface_hub makes for ``create_repo``, ``create_branch``,
``upload_folder`` (validate-yaml, preupload, the LFS batch API and its upload, the NDJSON commit) and
``hf_hub_download`` (``resolve``), keeping repos in memory. The tests push plans to it, load them back by repo id and
revision, load them offline from the HF cache that filled, check that every failure is one :class:`PlanError` saying
what to do, and run ``python -m calibrate --push-to-hub`` against it. Nothing reaches the internet: name lookups of
any host but the loopback one fail (in the CLI's subprocess too).

Server endpoints (``{repo}`` is ``namespace/name``; one made-up user ``me``, token :data:`TOKEN`):

- ``POST /api/repos/create``, ``POST /api/models/{repo}/branch/{branch}``, ``GET /api/models/{repo}[/revision/{rev}]``
- ``POST /api/validate-yaml``: the card's front matter must be a YAML mapping with well-typed Hub fields
- ``POST /api/models/{repo}/preupload/{rev}``: a file is LFS when the revision's ``.gitattributes`` says so (a new
  repo's, like the Hub's, sends ``*.safetensors`` to LFS), else a regular git blob
- ``POST /{repo}.git/info/lfs/objects/batch``, ``PUT /lfs-storage/{sha256}``, ``POST .../lfs/objects/verify``: the
  basic LFS transfer. The server does not speak Xet, so the fixture turns huggingface_hub's Xet path off
  (``HF_HUB_DISABLE_XET``); :func:`test_push_through_the_default_upload_pipeline` covers the path taken with Xet on
- ``POST /api/models/{repo}/commit/{branch}``: the NDJSON commit (header, ``file`` base64, ``lfsFile``, ``deletedFile``)
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag`` (git blob sha1) and, for LFS files,
  ``X-Linked-Etag`` (sha256) and ``X-Linked-Size``

Failures answer the Hub's status and ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``,
``GatedRepo``), so huggingface_hub raises its own error classes. Commits get 40-hex shas; branches move. Pull
requests are not implemented (a commit with ``create_pr`` is refused).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import torch
import yaml
from helpers import (
    error_line, forbid_internet, greedy, hub_config, hub_plan, no_internet_site, point_hub_at, random_ids,
)
from huggingface_hub import ModelCard, constants, hf_hub_download

import runtime
from calibrate.__main__ import main as calibrate_main
from runtime.hub import download_file, render_model_card
from runtime.plan import Plan, PlanError

REPO_ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------------------
# The loopback Hub
# --------------------------------------------------------------------------------------------------------

USER = "me"
TOKEN = "hf_loopback_token_of_me"
LFS_PATTERNS = ("*.bin", "*.gguf", "*.pt", "*.safetensors")
HUB_RELATIONS = ("adapter", "merge", "quantized", "finetune")


def git_blob_sha(content: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(content: bytes) -> bytes:
    """The git-lfs pointer file git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(content).hexdigest()}\n" \
        f"size {len(content)}\n".encode()


@dataclass(frozen=True)
class Blob:
    content: bytes
    lfs: bool

    @property
    def oid(self) -> str:
        """What preupload reports as the remote oid: sha256 for LFS files, the git blob sha1 otherwise."""
        return hashlib.sha256(self.content).hexdigest() if self.lfs else git_blob_sha(self.content)


@dataclass(frozen=True)
class Commit:
    sha: str
    message: str
    parent: str | None
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)

    def commit_at(self, revision: str) -> Commit | None:
        """The commit a branch name or full commit sha points to."""
        return self.commits.get(self.branches.get(revision, revision))


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class LoopbackHub(ThreadingHTTPServer):
    """The server (``endpoint`` is its URL). ``requests`` lists every ``"METHOD /path"`` it answered."""

    daemon_threads = True

    def __init__(self, lfs_patterns: tuple[str, ...] = LFS_PATTERNS) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.lfs_patterns = lfs_patterns
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[str] = []
        self.lock = threading.RLock()
        self._commits_made = 0

    def add_repo(self, repo_id: str, *, private: bool = False, gated: bool = False) -> Repo:
        """A new repo with the Hub's initial commit (a ``.gitattributes`` sending :data:`LFS_PATTERNS` to LFS)."""
        with self.lock:
            repo = self.repos[repo_id] = Repo(repo_id, private=private, gated=gated)
            attributes = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in self.lfs_patterns)
            self.commit(repo, "main", "initial commit", {".gitattributes": Blob(attributes.encode(), lfs=False)})
            return repo

    def commit(self, repo: Repo, branch: str, message: str, changes: dict[str, Blob | None]) -> Commit:
        """Apply ``changes`` (path -> blob, or None to delete) on top of ``branch`` and move the branch."""
        with self.lock:
            parent = repo.branches.get(branch)
            files = dict(repo.commits[parent].files) if parent else {}
            for path, blob in changes.items():
                if blob is None:
                    files.pop(path, None)
                else:
                    files[path] = blob
            self._commits_made += 1
            seed = json.dumps([parent, message, self._commits_made, sorted((p, b.oid) for p, b in files.items())])
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = Commit(sha, message, parent, files)
            repo.branches[branch] = sha
            return repo.commits[sha]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (path -> content)."""
        commit = self.repos[repo_id].commit_at(revision)
        assert commit is not None, f"{repo_id} has no revision {revision}"
        return {path: blob.content for path, blob in commit.files.items()}

    def is_lfs(self, commit: Commit, path: str) -> bool:
        attributes = commit.files.get(".gitattributes")
        text = attributes.content.decode() if attributes else ""
        patterns = [line.split()[0] for line in text.splitlines() if "filter=lfs" in line.split()[1:]]
        return any(fnmatch.fnmatchcase(PurePosixPath(path).name, pattern) for pattern in patterns)


_REPO = r"(?P<repo>[^/]+/[^/]+?)"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (method, re.compile(pattern), name)
    for method, pattern, name in [
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", rf"/api/models/{_REPO}(?:/revision/(?P<revision>[^/]+))?", "repo_info"),
        ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", rf"/api/models/{_REPO}/preupload/(?P<revision>[^/]+)", "preupload"),
        ("POST", rf"/api/models/{_REPO}/commit/(?P<revision>[^/]+)", "commit"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
        ("PUT", r"/lfs-storage/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("GET", rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", rf"/{_REPO}/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
    ]
]


class _Handler(BaseHTTPRequestHandler):
    server: LoopbackHub

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
        return None

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.server.requests.append(f"{self.command} {url.path}")
        try:
            for method, pattern, name in _ROUTES:
                match = pattern.fullmatch(url.path)
                if method == self.command and match:
                    args = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    with self.server.lock:
                        getattr(self, name)(**args)
                    return
            raise HubError(404, f"no route for {self.command} {url.path}")
        except HubError as error:
            self._send_json(error.status, {"error": error.message}, {
                "X-Error-Message": error.message,
                **({"X-Error-Code": error.code} if error.code else {}),
                **({"X-Repo-Commit": error.commit} if error.commit else {}),
            })

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json(self) -> Any:
        try:
            return json.loads(self._body() or b"{}")
        except ValueError as exc:
            raise HubError(400, f"the body is not JSON: {exc}") from exc

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

    @property
    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return USER if auth == f"Bearer {TOKEN}" else None

    def _readable(self, repo_id: str) -> Repo:
        """The repo, as the Hub shows it to this request's user (private repos: owner only; gated: refused)."""
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo.private and self._user != repo_id.split("/")[0]):
            raise HubError(401 if self._user is None else 404, "Repository not found", "RepoNotFound")
        if repo.gated and self._user != repo_id.split("/")[0]:
            raise HubError(
                401 if self._user is None else 403,
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated.",
                "GatedRepo",
            )
        return repo

    def _writable(self, repo_id: str) -> Repo:
        repo = self._readable(repo_id)
        if self._user != repo_id.split("/")[0]:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.commit_at(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # -- API ---------------------------------------------------------------------------------------------------

    def create_repo(self) -> None:
        payload = self._json()
        if self._user is None:
            raise HubError(401, "Invalid username or password.")
        namespace = payload.get("organization") or self._user
        if namespace != self._user:
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        if payload.get("type", "model") != "model":
            raise HubError(400, "the loopback Hub only has model repos")
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.server.endpoint}/{repo_id}"
        if repo_id in self.server.repos:
            self._send_json(409, {"error": "You already created this model repo", "url": url})
            return
        private = payload.get("private") is True or payload.get("visibility") == "private"
        self.server.add_repo(repo_id, private=private)
        self._send_json(200, {"url": url, "name": repo_id})

    def validate_yaml(self) -> None:
        content = self._json().get("content", "")
        errors = _card_metadata_errors(content)
        self._send_json(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})

    def repo_info(self, repo: str, revision: str = "main") -> None:
        found = self._readable(repo)
        commit = self._commit_at(found, revision)
        self._send_json(200, {
            "_id": hashlib.sha1(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo, "sha": commit.sha,
            "private": found.private, "gated": "manual" if found.gated else False, "disabled": False,
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        })

    def create_branch(self, repo: str, branch: str) -> None:
        found = self._writable(repo)
        start = self._json().get("startingPoint") or "main"
        if branch in found.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        found.branches[branch] = self._commit_at(found, start).sha
        self._send_json(200, {})

    def preupload(self, repo: str, revision: str) -> None:
        found = self._writable(repo)
        commit = self._commit_at(found, revision)
        files = []
        for item in self._json().get("files", []):
            path = item["path"]
            lfs = self.server.is_lfs(commit, path)
            remote = commit.files.get(path)
            files.append({
                "path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                "oid": remote.oid if remote is not None and remote.lfs == lfs else None,
            })
        self._send_json(200, {"files": files, "commitOid": commit.sha})

    def lfs_batch(self, repo: str) -> None:
        self._writable(repo)
        payload = self._json()
        if payload.get("operation") != "upload":
            raise HubError(400, "the loopback Hub's LFS batch endpoint only uploads")
        objects = []
        for item in payload.get("objects", []):
            oid, size = item["oid"], item["size"]
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.server.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.server.endpoint}/lfs-storage/{oid}", "header": {}},
                    "verify": {"href": f"{self.server.endpoint}/{repo}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self._send(200, body, {"Content-Type": "application/vnd.git-lfs+json"})

    def lfs_put(self, oid: str) -> None:
        content = self._body()
        if hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, f"the uploaded content does not hash to {oid}")
        self.server.lfs_objects[oid] = content
        self._send(200, b"", {})

    def lfs_verify(self, repo: str) -> None:
        self._writable(repo)
        payload = self._json()
        content = self.server.lfs_objects.get(payload.get("oid", ""))
        if content is None or len(content) != payload.get("size"):
            raise HubError(404, f"LFS object {payload.get('oid')} was not uploaded")
        self._send_json(200, {"success": True})

    def commit(self, repo: str, revision: str) -> None:
        found = self._writable(repo)
        if self.query.get("create_pr"):
            raise HubError(400, "the loopback Hub has no pull requests")
        if revision not in found.branches:
            if found.commit_at(revision) is not None:
                raise HubError(400, f"Invalid rev id: {revision} (commits go to a branch)")
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        lines = [json.loads(line) for line in self._body().decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "a commit starts with its header line")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, found.branches[revision]):
            raise HubError(412, f"parent commit {header['parentCommit']} is not the head of {revision}")
        changes: dict[str, Blob | None] = {}
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                changes[value["path"]] = Blob(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                content = self.server.lfs_objects.get(value["oid"])
                if content is None or ("size" in value and len(content) != value["size"]):
                    raise HubError(400, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                changes[value["path"]] = Blob(content, lfs=True)
            elif key == "deletedFile":
                changes[value["path"]] = None
            else:
                raise HubError(400, f"the loopback Hub does not implement commit operation {key!r}")
        made = self.server.commit(found, revision, header.get("summary", ""), changes)
        self._send_json(200, {
            "success": True, "commitOid": made.sha, "commitUrl": f"{self.server.endpoint}/{repo}/commit/{made.sha}",
            "commitMessage": made.message,
        })

    def resolve(self, repo: str, revision: str, path: str) -> None:
        found = self._readable(repo)
        commit = self._commit_at(found, revision)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound", commit=commit.sha)
        headers = {"X-Repo-Commit": commit.sha, "Content-Type": "application/octet-stream"}
        if blob.lfs:
            headers["ETag"] = f'"{git_blob_sha(lfs_pointer(blob.content))}"'
            headers["X-Linked-Etag"] = f'"{blob.oid}"'
            headers["X-Linked-Size"] = str(len(blob.content))
        else:
            headers["ETag"] = f'"{blob.oid}"'
        self._send(200, blob.content, headers)


def _card_metadata_errors(content: str) -> list[str]:
    """What the Hub would refuse in a README's front matter (a YAML mapping; the Hub fields kvplan writes typed)."""
    if not content.startswith("---\n") or "\n---" not in content[3:]:
        return []  # no front matter: the Hub accepts it (and warns)
    try:
        meta = yaml.safe_load(content[4 : content.index("\n---", 3)])
    except yaml.YAMLError as exc:
        return [f"YAML front matter is not valid YAML: {exc}"]
    if not isinstance(meta, dict):
        return ["YAML front matter must be a mapping"]
    errors = []
    for key in ("library_name", "license", "pipeline_tag", "base_model_relation"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "base_model"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(item, str) for item in value)
        )):
            errors.append(f'"{key}" must be a string or a list of strings')
    if meta.get("base_model_relation") not in (None, *HUB_RELATIONS):
        errors.append(f'"base_model_relation" must be one of {", ".join(HUB_RELATIONS)}')
    return errors


# --------------------------------------------------------------------------------------------------------
# Fixtures: no internet, huggingface_hub pointed at the loopback Hub
# --------------------------------------------------------------------------------------------------------

REPO = f"{USER}/tiny-kvplan"
BASE_REVISION = "5f3d2c1b0a9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c"
CALIBRATE_ARGS = ["--max-seq-length", "256", "--num-calibration-samples", "2"]


@pytest.fixture(autouse=True)
def no_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_internet(monkeypatch)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[LoopbackHub]:
    """A running loopback Hub that huggingface_hub uses (online, an empty HF cache, the token of ``me``, Xet off)."""
    server = LoopbackHub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    point_hub_at(monkeypatch, server.endpoint, tmp_path / "hf-home", token=TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the server speaks LFS, not Xet
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _subprocess_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """The environment of a test subprocess: ``variables``, an isolated HF home and kvplan cache, no internet."""
    guard = no_internet_site(tmp_path / "no-internet")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING_FACE"))}
    env.update(
        PYTHONPATH=os.pathsep.join([str(guard), str(REPO_ROOT)]), HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1", KVPLAN_CACHE=str(tmp_path / "kvplan-cache"), **variables,
    )
    return env


def card_plan() -> Plan:
    """:func:`hub_plan` as a calibration on Hub data records it: the base model's commit, the data, a license."""
    fingerprint = {**runtime.fingerprint_from_model(hub_config()), "revision": BASE_REVISION}
    recipe = {
        "model": "org/base-model", "model_revision": "main", "dataset": "org/calibration-text", "splits": "train",
        "license": "apache-2.0", "methods": ["pyramidinfer", "kvsharer"], "target_ratio": 0.5,
        "pyramidinfer": {"window": 8, "sink": 2},
    }
    provenance = {
        "data_source": "hf:org/calibration-text[train] (64 documents; packed into sequences of 256 tokens)",
        "num_samples": 4, "num_tokens": 1024, "seed": 0,
    }
    return hub_plan(fingerprint=fingerprint, recipe=recipe, provenance=provenance)


def plan_error(call: Any) -> str:
    """The message of the one PlanError ``call()`` raises (a single line)."""
    with pytest.raises(PlanError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------------------------------------
# (a) push, then load back by repo id and revision
# --------------------------------------------------------------------------------------------------------


def test_push_then_load_by_repo_id_and_revision(fake_hub: LoopbackHub) -> None:
    plan = card_plan()
    sha = plan.push_to_hub(REPO, revision="ratio-0.5", private=True, commit_message="tiny plan, ratio 0.5")

    repo = fake_hub.repos[REPO]
    assert re.fullmatch(r"[0-9a-f]{40}", sha) and repo.branches["ratio-0.5"] == sha
    assert repo.private and repo.commits[sha].message == "tiny plan, ratio 0.5"
    assert set(fake_hub.files(REPO, "main")) == {".gitattributes"}  # the branch has the plan, main does not
    files = repo.commits[sha].files
    assert sorted(files) == [".gitattributes", "README.md", "plan.safetensors", "recipe.yaml"]
    assert files["plan.safetensors"].lfs and not files["README.md"].lfs and not files["recipe.yaml"].lfs
    oid = hashlib.sha256(plan.to_bytes()).hexdigest()
    for request in (
        "POST /api/repos/create", f"POST /api/models/{REPO}/branch/ratio-0.5", "POST /api/validate-yaml",
        f"POST /api/models/{REPO}/preupload/ratio-0.5", f"POST /{REPO}.git/info/lfs/objects/batch",
        f"PUT /lfs-storage/{oid}", f"POST /{REPO}.git/info/lfs/objects/verify",
        f"POST /api/models/{REPO}/commit/ratio-0.5",
    ):
        assert request in fake_hub.requests, request

    for revision in ("ratio-0.5", sha):
        assert Path(download_file(REPO, revision=revision)).read_bytes() == plan.to_bytes()
        loaded = runtime.load_plan(REPO, revision=revision)
        assert loaded == plan and loaded.to_bytes() == plan.to_bytes()
        loaded.validate(hub_config())
        assert Plan.from_pretrained(REPO, revision=revision) == plan
    cache = Path(constants.HF_HUB_CACHE) / "models--me--tiny-kvplan"
    assert (cache / "refs" / "ratio-0.5").read_text() == sha
    assert (cache / "blobs" / oid).read_bytes() == plan.to_bytes()  # kept under its LFS sha256, as from the Hub

    recipe = Path(hf_hub_download(REPO, "recipe.yaml", revision=sha)).read_text(encoding="utf-8")
    assert yaml.safe_load(recipe) == plan.recipe
    readme = Path(hf_hub_download(REPO, "README.md", revision=sha)).read_text(encoding="utf-8")
    assert readme == render_model_card(plan, REPO, revision="ratio-0.5")
    card = ModelCard(readme)
    assert card.data.base_model == "org/base-model" and card.data.base_model_revision == BASE_REVISION
    assert card.data.base_model_relation == "adapter" and card.data.library_name == "kvplan"
    assert card.data.license == "apache-2.0" and card.data.datasets == ["org/calibration-text"]
    assert card.data.tags == ["kvplan", "kv-cache", "kv-cache-compression", "pyramidinfer", "kvsharer"]
    assert f'runtime.load_plan("{REPO}", revision="ratio-0.5")' in card.text
    calibration = card.text.split("## Calibration")[1].split("##")[0]
    assert BASE_REVISION in calibration and "hf:org/calibration-text[train]" in calibration
    assert "4 sequences, 1,024 tokens, seed 0" in calibration and "recipe.yaml" in calibration


def test_a_plan_loaded_from_the_hub_applies(fake_hub: LoopbackHub) -> None:
    import transformers

    sha = card_plan().push_to_hub(REPO)
    plan = runtime.load_plan(REPO, revision=sha)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hub_config()).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = random_ids(1, 48)
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    stock = model.generate(ids, **kwargs)
    with runtime.apply_plan(model, plan):
        planned = model.generate(ids, **kwargs)
    assert planned.sequences.shape == stock.sequences.shape == (1, 52)
    kept = runtime.kept_lengths(planned.past_key_values)
    assert kept[1] == kept[3] == 0  # KVSharer: layers 1 and 3 reuse the KV of layers 0 and 2
    assert 0 < kept[2] < kept[0]  # PyramidInfer: layer 2 (keep 0.5) holds fewer tokens than layer 0 (keep 1.0)
    assert runtime.physical_bytes(planned.past_key_values) < runtime.physical_bytes(stock.past_key_values)
    assert torch.equal(greedy(model, ids, 4), stock.sequences)  # removed: the model is stock again


def test_push_through_the_default_upload_pipeline(fake_hub: LoopbackHub, monkeypatch: pytest.MonkeyPatch) -> None:
    """With hf_xet installed (a default install) upload_folder takes another route; a Hub that keeps every file in git
    (no LFS patterns) lets that route run here without Xet storage."""
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    fake_hub.lfs_patterns = ()
    plan = hub_plan()
    sha = plan.push_to_hub(REPO, revision="ratio-0.5")
    assert not any("lfs" in request or "xet" in request for request in fake_hub.requests), fake_hub.requests
    assert fake_hub.files(REPO, sha)["plan.safetensors"] == plan.to_bytes()
    assert runtime.load_plan(REPO, revision=sha) == plan


# --------------------------------------------------------------------------------------------------------
# (b) offline, from the HF cache a push and a load filled
# --------------------------------------------------------------------------------------------------------


def test_offline_loads_from_the_cache_with_and_without_a_pinned_revision(
    fake_hub: LoopbackHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    plan = card_plan()
    other = hub_plan(tensors={**plan.tensors, "pyramidinfer.layer_keep": torch.tensor([1.0, 0.25, 0.25, 0.125])})
    main_sha = plan.push_to_hub(REPO)
    branch_sha = other.push_to_hub(REPO, revision="ratio-0.25")
    assert runtime.load_plan(REPO) == plan  # online: caches the file and refs/main
    assert runtime.load_plan(REPO, revision=branch_sha) == other  # online, pinned: cached under its commit only
    answered = len(fake_hub.requests)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert runtime.load_plan(REPO) == plan
    assert runtime.load_plan(REPO, revision=main_sha) == plan
    assert runtime.load_plan(REPO, revision=branch_sha) == other
    message = plan_error(lambda: runtime.load_plan(REPO, revision="ratio-0.25"))  # that branch was never resolved
    assert "ratio-0.25 is not in the local HF cache and offline mode is on" in message

    # A new process with HF_HUB_OFFLINE=1 set before huggingface_hub is imported, as a user runs it.
    script = (
        "import hashlib, sys, runtime\n"
        "for revision in (None, *sys.argv[1:]):\n"
        f"    print(hashlib.sha256(runtime.load_plan({REPO!r}, revision=revision).to_bytes()).hexdigest())\n"
    )
    env = _subprocess_env(tmp_path, HF_HUB_OFFLINE="1", HF_HUB_CACHE=constants.HF_HUB_CACHE,
                          HF_ENDPOINT=fake_hub.endpoint)
    done = subprocess.run([sys.executable, "-c", script, main_sha, branch_sha], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    digests = [hashlib.sha256(p.to_bytes()).hexdigest() for p in (plan, plan, other)]
    assert done.stdout.split() == digests
    assert len(fake_hub.requests) == answered  # offline: nothing reached the server


# --------------------------------------------------------------------------------------------------------
# (c) every failure is one PlanError that says what to do
# --------------------------------------------------------------------------------------------------------


def _repo_with(hub: LoopbackHub, repo_id: str, files: dict[str, bytes], **flags: bool) -> None:
    hub.add_repo(repo_id, **flags)
    hub.commit(hub.repos[repo_id], "main", "add files", {p: Blob(c, lfs=p.endswith(".safetensors")) for p, c in
                                                         files.items()})


@pytest.mark.parametrize(
    "case, expected",
    [
        ("repo missing", "Hub repo me/no-such-repo not found: check the repo id; if it is private, log in with"),
        ("private, no token", f"Hub repo {REPO} not found: check the repo id; if it is private, log in with"),
        ("revision missing", f"revision 'no-such-branch' not found in {REPO}; use a branch, tag or full commit sha"),
        ("gated", "other/gated-kvplan is gated: accept its terms on its Hub page, then log in with"),
        ("offline, not cached", f"{REPO}/plan.safetensors@main is not in the local HF cache and offline mode is on "
                                "(HF_HUB_OFFLINE=1): load it once with network access to cache it"),
        ("no plan file", f"{REPO}@main has no file 'plan.safetensors': check that it is a kvplan plan repo"),
        ("not a plan", f"{REPO}/plan.safetensors@main: "),
    ],
)
def test_each_failure_is_one_plan_error_that_says_what_to_do(
    case: str, expected: str, fake_hub: LoopbackHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    import random

    plan = hub_plan()
    repo_id = {"repo missing": "me/no-such-repo", "gated": "other/gated-kvplan"}.get(case, REPO)
    files = {
        "no plan file": {"recipe.yaml": b"model: org/base-model\n"},
        "not a plan": {"plan.safetensors": random.Random(0).randbytes(4096)},
    }.get(case, {"plan.safetensors": plan.to_bytes()})
    if case != "repo missing":
        _repo_with(fake_hub, repo_id, files, private=case == "private, no token", gated=case == "gated")
    if case == "private, no token":
        monkeypatch.delenv("HF_TOKEN")
    if case == "offline, not cached":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    revision = "no-such-branch" if case == "revision missing" else None

    message = plan_error(lambda: runtime.load_plan(repo_id, revision=revision))
    assert expected in message, message
    if case == "not a plan":
        assert "not a kvplan plan" in message and "check the repo id, revision and filename" in message
    if case != "offline, not cached":
        assert any(request.startswith(f"HEAD /{repo_id}/resolve/") for request in fake_hub.requests)


def test_push_failures_are_plan_errors_that_say_what_to_do(
    fake_hub: LoopbackHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = hub_plan()
    message = plan_error(lambda: plan.push_to_hub("other/kvplan"))
    assert "your token may not write to other/kvplan: check the namespace" in message
    monkeypatch.delenv("HF_TOKEN")
    assert "log in with `hf auth login` or set HF_TOKEN" in plan_error(lambda: plan.push_to_hub(REPO))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert "offline mode is on (HF_HUB_OFFLINE=1): unset it to push" in plan_error(lambda: plan.push_to_hub(REPO))
    assert "'not a repo' is not a Hub repo id" in plan_error(lambda: plan.push_to_hub("not a repo"))
    assert not fake_hub.repos


# --------------------------------------------------------------------------------------------------------
# (d) python -m calibrate --push-to-hub
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from make_tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), layers=3)


def test_calibrate_pushes_to_the_hub_that_hf_endpoint_names(fake_hub: LoopbackHub, tiny_dir: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "plan.safetensors"
    argv = [sys.executable, "-m", "calibrate", str(tiny_dir), "--out", str(out), *CALIBRATE_ARGS,
            "--push-to-hub", REPO, "--hub-revision", "ratio-0.5", "--private", "--license", "apache-2.0"]
    env = _subprocess_env(tmp_path, HF_ENDPOINT=fake_hub.endpoint, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0",
                          HF_HUB_DISABLE_XET="1")
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""

    sha = fake_hub.repos[REPO].branches["ratio-0.5"]
    assert f"pushed to {fake_hub.endpoint}/{REPO} (ratio-0.5) at commit {sha}" in done.stderr
    assert "HTTP Request" not in done.stderr  # the HTTP client's log lines stay off the summary
    assert fake_hub.repos[REPO].private
    plan = Plan.load(out)
    files = fake_hub.files(REPO, sha)
    assert files["plan.safetensors"] == out.read_bytes()
    assert yaml.safe_load(files["recipe.yaml"]) == plan.recipe
    card = ModelCard(files["README.md"].decode())
    assert card.data.license == "apache-2.0" and card.data.library_name == "kvplan"
    assert card.data.base_model is None  # a local model directory has no Hub id
    measured = card.text.split("## Measured")[1].split("## Per-layer plan")[0]
    assert "mean captured attention mass" in measured and f"python -m runtime eval <model> --plan {REPO}" in measured
    assert runtime.load_plan(REPO, revision="ratio-0.5") == plan


def test_calibrate_push_failure_keeps_the_plan_and_prints_one_line(
    fake_hub: LoopbackHub, tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plan.safetensors"
    assert calibrate_main([str(tiny_dir), "--out", str(out), *CALIBRATE_ARGS, "--push-to-hub", "other/kvplan",
                           "-q"]) == 1
    line = error_line(capsys)
    assert "your token may not write to other/kvplan" in line and f"(the plan is saved in {out})" in line
    Plan.load(out)
    assert "other/kvplan" not in fake_hub.repos


@pytest.mark.parametrize(
    "extra, online, expected",
    [
        (["--private"], False, "--private only applies with --push-to-hub REPO"),
        (["--hub-revision", "b", "--license", "mit"], False, "--hub-revision, --license only apply with --push-to-hub"),
        (["--push-to-hub", "not a repo"], False, "--push-to-hub takes a Hub repo id like 'org/name', not 'not a repo'"),
        (["--push-to-hub", REPO], False, "--push-to-hub needs the network, but HF_HUB_OFFLINE=1 is set"),
        (["--push-to-hub", REPO], True, "--push-to-hub needs a Hub token with write access"),
    ],
)
def test_calibrate_push_options_are_checked_before_calibrating(
    extra: list[str], online: bool, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if online:  # online, but nobody is logged in (no server: nothing may be asked)
        point_hub_at(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf-home")
    else:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "plan.safetensors"
    assert calibrate_main(["org/never-loaded", "--out", str(out), *extra]) == 2
    assert expected in error_line(capsys)
    assert not out.exists()
