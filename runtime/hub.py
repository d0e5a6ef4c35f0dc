"""Plans on the Hugging Face Hub: download (through the normal HF cache) and upload with a model card.

Repo layout (one plan per repo; variants are branches or tags)::

    <org>/<base-name>-kvplan
    ├── README.md          model card (base_model, library_name: kvplan, tags)
    ├── plan.safetensors   the plan
    └── recipe.yaml        the resolved calibration recipe, human readable
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from huggingface_hub import HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub import errors as hub_errors

from . import registry
from .errors import PlanError
from .planfile import DEFAULT_FILENAME, installed_version

if TYPE_CHECKING:  # the plan module imports this one; only the type is needed here
    from .plan import Plan

__all__ = ["download_file", "looks_like_repo_id", "push_plan", "render_model_card", "where", "write_plan_folder"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` with Hub-legal characters (and not a file name such as ``x/plan.safetensors``)."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text and "--" not in text and not text.endswith(".safetensors")

_OFFLINE_HINT = (
    "if you are offline (HF_HUB_OFFLINE=1) the file must already be in the HF cache; pin the plan with "
    "revision=<40-hex commit sha> so a cached copy is found without any network access"
)


def where(repo_id: str, filename: str, revision: str | None) -> str:
    return f"{repo_id}/{filename}@{revision or 'main'}"


def _download_error(exc: Exception, repo_id: str, filename: str, revision: str | None) -> PlanError:
    """Translate a huggingface_hub failure into a PlanError that says what to do."""
    place = where(repo_id, filename, revision)
    cause = exc.__cause__
    if isinstance(exc, hub_errors.LocalEntryNotFoundError) and isinstance(cause, hub_errors.HfHubHTTPError):
        exc = cause  # huggingface_hub hides the server's answer behind "not in the cache"; report the answer
    if isinstance(exc, hub_errors.GatedRepoError):
        message = f"{repo_id} is gated: accept its terms on the Hub and log in (`hf auth login` or HF_TOKEN)"
    elif isinstance(exc, hub_errors.RepositoryNotFoundError):
        message = f"Hub repo {repo_id} not found (or private: log in with `hf auth login` or set HF_TOKEN)"
    elif isinstance(exc, hub_errors.RevisionNotFoundError):
        message = f"revision {revision!r} not found in {repo_id}; use a branch, tag or full commit sha that exists"
    elif isinstance(exc, hub_errors.LocalEntryNotFoundError):
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        message = f"{place} is not in the local HF cache and could not be downloaded{detail}; {_OFFLINE_HINT}"
    elif isinstance(exc, hub_errors.EntryNotFoundError) or _http_status(exc) == 404:
        message = f"{place} not found on the Hub (no such repo, file or revision); check all three"
    elif isinstance(exc, hub_errors.OfflineModeIsEnabled):
        message = f"cannot download {place}: offline mode is on; {_OFFLINE_HINT}"
    elif isinstance(exc, hub_errors.HFValidationError):
        message = f"{repo_id!r} is not a valid Hub repo id ({exc})"
    else:
        message = f"could not download {place}: {type(exc).__name__}: {exc}; {_OFFLINE_HINT}"
    return PlanError(message)


def _http_status(exc: Exception) -> int | None:
    """The HTTP status of a huggingface_hub HTTP error, if any."""
    return getattr(getattr(exc, "response", None), "status_code", None)


def download_file(
    repo_id: str,
    revision: str | None = None,
    filename: str = DEFAULT_FILENAME,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    local_files_only: bool | None = None,
) -> str:
    """Fetch ``filename`` from Hub repo ``repo_id`` (through the HF cache); returns the local path.

    ``local_files_only=None`` follows huggingface_hub's default (network unless ``HF_HUB_OFFLINE=1``).
    Every failure raises :class:`PlanError` saying what to do; ``Plan.from_pretrained`` loads the file.
    """
    try:
        path = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            endpoint=endpoint,
            local_files_only=bool(local_files_only),
            library_name="kvplan",
            library_version=installed_version(),
        )
    # Besides huggingface_hub's own errors, the transport library (requests, httpx or httpx2 depending on the
    # huggingface_hub version) may raise its own; every failure here means "no plan", so all are translated.
    except Exception as exc:  # noqa: BLE001
        raise _download_error(exc, repo_id, filename, revision) from exc
    return path


# ----------------------------------------------------------------------------------------------------------
# Upload
# ----------------------------------------------------------------------------------------------------------


def _base_model(plan: Plan) -> str | None:
    name = plan.fingerprint.get("name_or_path") or ""
    return name if isinstance(name, str) and looks_like_repo_id(name) else None


def _card_data(plan: Plan) -> ModelCardData:
    license_name = plan.recipe.get("license") if isinstance(plan.recipe.get("license"), str) else None
    return ModelCardData(
        base_model=_base_model(plan),
        base_model_relation="adapter",
        library_name="kvplan",
        license=license_name,
        tags=["kvplan", "kv-cache", "kv-cache-compression", *plan.methods],
        pipeline_tag="text-generation",
    )


def _layer_table(plan: Plan) -> list[str]:
    """Markdown table with one row per layer: each enabled method's column (its registration's ``card_column``)."""
    columns = [spec.card_column for spec in registry.specs(plan.methods) if spec.card_column is not None]
    present = [(title, plan.tensors[name].tolist(), fmt) for title, name, fmt in columns if name in plan.tensors]
    if not present:
        return ["Every layer keeps its full KV cache (no method is enabled)."]
    header = "| layer | " + " | ".join(title for title, _, _ in present) + " |"
    lines = [header, "|" + "---|" * (len(present) + 1)]
    for layer in range(plan.num_layers):
        cells = " | ".join(fmt(values[layer]) for _, values, fmt in present)
        lines.append(f"| {layer} | {cells} |")
    return lines


def _json_block(value: Any) -> list[str]:
    return ["```json", json.dumps(value, indent=2, sort_keys=True), "```"]


def _body(plan: Plan, repo_id: str | None, results: str | None = None) -> list[str]:
    fp = plan.fingerprint
    base = fp.get("name_or_path") or fp.get("model_type")
    revision = fp.get("revision")
    lines = [f"# KV-cache plan for {base}", ""]
    lines.append(
        f"A [kvplan](https://pypi.org/project/kvplan/) plan for `{base}`"
        + (f" (revision `{revision}`)" if revision else "")
        + ": offline-calibrated KV-cache compression applied at generation time. It holds no weights; "
        "load the base model as usual and apply the plan."
    )
    lines += ["", "## What it does", ""]
    lines += [f"- {spec.description}" for spec in registry.specs(plan.methods)] or ["- nothing (a no-op plan)"]
    if plan.target_ratio is not None:
        lines += ["", f"Target: keep {float(plan.target_ratio):.1%} of the full KV-cache memory."]
    if plan.params:
        lines += ["", "Parameters:", "", *_json_block(plan.params)]
    if results:
        lines += ["", "## Measured", "", results.strip()]
    lines += ["", "## Per-layer plan", "", *_layer_table(plan)]
    lines += ["", "## How to load", "", *_usage(plan, repo_id)]
    lines += ["", "## Provenance", "", f"Made with kvplan {plan.kvplan_version}.", "", *_json_block(plan.provenance)]
    lines += ["", "Model structure the plan was calibrated for:", "", *_json_block(fp), ""]
    return lines


def _usage(plan: Plan, repo_id: str | None) -> list[str]:
    fp = plan.fingerprint
    base = fp.get("name_or_path") or "<base model>"
    revision = f', revision="{fp["revision"]}"' if fp.get("revision") else ""
    return [
        "```python",
        "from transformers import AutoModelForCausalLM",
        "import runtime",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{base}"{revision})',
        f'plan = runtime.load_plan("{repo_id or "<this repo>"}")',
        "runtime.apply_plan(model, plan)",
        "```",
    ]


def render_model_card(plan: Plan, repo_id: str | None = None, results: str | None = None) -> str:
    """The ``README.md`` for a plan repo: YAML front matter (base_model, tags, ...) and a short body.

    ``results``: markdown of measured figures (fidelity, memory, speed and the commands that printed them), shown
    under "Measured"; the card states nothing measured without it.
    """
    card = ModelCard(f"---\n{_card_data(plan).to_yaml()}\n---\n\n" + "\n".join(_body(plan, repo_id, results)))
    return str(card)


def write_plan_folder(
    plan: Plan, folder: str | Path, repo_id: str | None = None, results: str | None = None
) -> Path:
    """Write ``plan.safetensors``, ``recipe.yaml`` and ``README.md`` into ``folder`` (validates the plan)."""
    folder = Path(folder)
    plan.save(folder / DEFAULT_FILENAME)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(plan.recipe, sort_keys=True), encoding="utf-8")
    (folder / "README.md").write_text(render_model_card(plan, repo_id, results), encoding="utf-8")
    return folder


def push_plan(
    plan: Plan,
    repo_id: str,
    revision: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    api: Any = None,
    results: str | None = None,
) -> str:
    """Upload ``plan`` with its recipe and model card to Hub repo ``repo_id``; returns the commit sha.

    ``revision`` names a branch (created if missing). ``api`` defaults to ``HfApi(token=token)``. ``results``:
    markdown of measured figures for the card (see :func:`render_model_card`).
    """
    api = api if api is not None else HfApi(token=token)
    message = commit_message or f"Upload kvplan plan ({', '.join(plan.methods) or 'no-op'})"
    with tempfile.TemporaryDirectory(prefix="kvplan-push-") as folder:
        write_plan_folder(plan, folder, repo_id, results)
        api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=message,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
    return str(info.oid)
