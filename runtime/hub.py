"""Plans on the Hugging Face Hub: download (through the normal HF cache) and upload with a model card.

Repo layout (one plan per repo; variants are branches or tags)::

    <org>/<base-name>-kvplan
    ├── README.md          model card (base_model, library_name: kvplan, tags, datasets, ...)
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
from huggingface_hub import HfApi, ModelCard, ModelCardData, constants, hf_hub_download
from huggingface_hub import errors as hub_errors

from . import registry
from .errors import PlanError
from .planfile import DEFAULT_FILENAME, installed_version

if TYPE_CHECKING:  # the plan module imports this one; only the type is needed here
    from .plan import Plan

__all__ = ["download_file", "looks_like_repo_id", "push_plan", "render_model_card", "where", "write_plan_folder"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_DATASET_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.\-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")
_LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` with Hub-legal characters (and not a file name such as ``x/plan.safetensors``)."""
    legal = bool(_REPO_ID.fullmatch(text)) and ".." not in text and "--" not in text
    return legal and not text.endswith(".safetensors")


_PIN_HINT = "pin the plan with revision=<40-hex commit sha> so a cached copy is found without any network access"
_OFFLINE_HINT = f"if you are offline (HF_HUB_OFFLINE=1) the file must already be in the HF cache; {_PIN_HINT}"


def where(repo_id: str, filename: str, revision: str | None) -> str:
    return f"{repo_id}/{filename}@{revision or 'main'}"


def _download_error(exc: Exception, repo_id: str, filename: str, revision: str | None) -> PlanError:
    """Translate a huggingface_hub failure into a PlanError that says what to do."""
    place = where(repo_id, filename, revision)
    cause = exc.__cause__
    if isinstance(exc, hub_errors.LocalEntryNotFoundError) and isinstance(cause, hub_errors.HfHubHTTPError):
        exc, cause = cause, cause.__cause__  # huggingface_hub hides the server's answer behind "not cached"
    if isinstance(exc, hub_errors.GatedRepoError):
        message = f"{repo_id} is gated: accept its terms on its Hub page, then {_LOGIN_HINT} with that account"
    elif isinstance(exc, hub_errors.RepositoryNotFoundError):
        message = f"Hub repo {repo_id} not found: check the repo id; if it is private, {_LOGIN_HINT}"
    elif isinstance(exc, hub_errors.RevisionNotFoundError):
        message = (
            f"revision {revision!r} not found in {repo_id}; use a branch, tag or full commit sha that exists "
            f"(`HfApi().list_repo_refs({repo_id!r})` lists the branches and tags)"
        )
    elif isinstance(exc, hub_errors.LocalEntryNotFoundError):
        message = _not_cached_message(place, cause)
    elif isinstance(exc, hub_errors.RemoteEntryNotFoundError):
        message = (
            f"{repo_id}@{revision or 'main'} has no file {filename!r}: check that it is a kvplan plan repo "
            f"(plan.push_to_hub writes {DEFAULT_FILENAME}) or pass filename=<the plan's file name>"
        )
    elif _http_status(exc) == 404:
        message = f"{place} not found on the Hub (no such repo, file or revision); check all three"
    elif isinstance(exc, hub_errors.OfflineModeIsEnabled):
        message = f"cannot download {place}: offline mode is on; {_OFFLINE_HINT}"
    elif isinstance(exc, hub_errors.HFValidationError):
        message = f"{repo_id!r} is not a valid Hub repo id ({exc})"
    else:
        message = f"could not download {place}: {type(exc).__name__}: {exc}; {_OFFLINE_HINT}"
    return PlanError(message)


def _not_cached_message(place: str, cause: BaseException | None) -> str:
    """The file is not in the HF cache and the Hub was not asked (offline) or did not answer."""
    if isinstance(cause, hub_errors.OfflineModeIsEnabled) or (cause is None and constants.is_offline_mode()):
        why, todo = "offline mode is on (HF_HUB_OFFLINE=1)", "load it once with network access to cache it"
        hint = _PIN_HINT
    elif cause is None:
        why, todo = "local_files_only=True", "load it once without local_files_only to cache it"
        hint = _OFFLINE_HINT
    else:
        why = f"the Hub at {constants.ENDPOINT} could not be reached ({type(cause).__name__}: {cause})"
        todo, hint = "check the network (and HF_ENDPOINT)", _OFFLINE_HINT
    return f"{place} is not in the local HF cache and {why}: {todo}; {hint}"


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
    token: str | bool | None = None,
) -> str:
    """Fetch ``filename`` from Hub repo ``repo_id`` (through the HF cache); returns the local path.

    ``local_files_only=None`` follows huggingface_hub's default (network unless ``HF_HUB_OFFLINE=1``); ``token``
    defaults to the logged-in one. Every failure raises :class:`PlanError` saying what to do;
    ``Plan.from_pretrained`` loads the file.
    """
    try:
        path = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            endpoint=endpoint,
            local_files_only=bool(local_files_only),
            token=token,
            library_name="kvplan",
            library_version=installed_version(),
        )
    # Besides huggingface_hub's own errors, the transport library (requests, httpx or httpx2 depending on the
    # huggingface_hub version) may raise its own; every failure here means "no plan", so all are translated.
    except Exception as exc:  # noqa: BLE001
        raise _download_error(exc, repo_id, filename, revision) from exc
    return path


# ----------------------------------------------------------------------------------------------------------
# Model card
# ----------------------------------------------------------------------------------------------------------


def _base_model(plan: Plan, base_model: str | None = None) -> str | None:
    """The Hub repo id of the model the plan is for: ``base_model`` if given, else the recipe's ``base_model`` (the
    model a GGUF or ``pypi:`` source was quantized from), else the calibrated model's name when it is a repo id."""
    if base_model is not None:
        if not looks_like_repo_id(base_model):
            raise PlanError(f"base_model {base_model!r} is not a Hub repo id like 'org/name'")
        return base_model
    recorded = plan.recipe.get("base_model")
    if isinstance(recorded, str) and looks_like_repo_id(recorded):
        return recorded
    name = plan.fingerprint.get("name_or_path") or ""
    return name if isinstance(name, str) and looks_like_repo_id(name) else None


def _loaded_from(plan: Plan) -> str:
    """What the calibration loaded (the fingerprint's name: a repo id, a ``pypi:`` GGUF, a path)."""
    return plan.fingerprint.get("name_or_path") or plan.fingerprint.get("model_type") or "<base model>"


def _base_revision(plan: Plan) -> str | None:
    """The base model's Hub commit the plan was calibrated on (recorded by the calibration), else None."""
    revision = plan.fingerprint.get("revision")
    return revision if isinstance(revision, str) and revision else None


def _datasets(plan: Plan) -> list[str] | None:
    """The calibration data's Hub dataset id, when the calibration read a Hub dataset (``hf:`` data source)."""
    source, dataset = plan.provenance.get("data_source"), plan.recipe.get("dataset")
    if isinstance(source, str) and source.startswith("hf:") and isinstance(dataset, str):
        if _DATASET_ID.fullmatch(dataset) and ".." not in dataset:
            return [dataset]
    return None


def _license(plan: Plan, license: str | None) -> str | None:
    """``license`` if given, else the recipe's ``license`` field; never guessed."""
    if license is not None:
        return license
    recorded = plan.recipe.get("license")
    return recorded if isinstance(recorded, str) and recorded else None


def _card_data(plan: Plan, license: str | None = None, base_model: str | None = None) -> ModelCardData:
    base_model = _base_model(plan, base_model)
    calibrated_on_base = base_model is not None and base_model == _loaded_from(plan)
    return ModelCardData(
        base_model=base_model,
        # The Hub knows adapter, merge, quantized and finetune. A plan holds no weights: it is loaded beside the
        # unchanged base model and changes how that model runs, like an adapter; the other three all name new
        # weights made from the base, which a plan is not.
        base_model_relation="adapter",
        library_name="kvplan",
        license=_license(plan, license),
        datasets=_datasets(plan),
        tags=["kvplan", "kv-cache", "kv-cache-compression", *plan.methods],
        pipeline_tag="text-generation",
        # Not a Hub field (the Hub's model tree has no revision): kept so the exact base commit is machine readable.
        # (only when the calibrated weights are the base repo's own: a GGUF's commit is not the base's)
        base_model_revision=_base_revision(plan) if calibrated_on_base else None,
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


def _calibration(plan: Plan, base_model: str | None = None) -> list[str]:
    """What the plan was calibrated on: base model and revision, data, amount, seed, and the recipe file."""
    prov = plan.provenance
    loaded = _loaded_from(plan)
    revision = _base_revision(plan)
    lines = [f"- Weights: `{loaded}`" + (f" at commit `{revision}`" if revision else " (no Hub commit recorded)")]
    if base_model is not None and base_model != loaded:
        lines[0] += f", a copy of [{base_model}](https://huggingface.co/{base_model})"
    source = prov.get("data_source")
    if isinstance(source, str) and source:
        data = f"- Data: `{source}`"
        datasets = _datasets(plan)
        if datasets:
            data += f" ([{datasets[0]}](https://huggingface.co/datasets/{datasets[0]}))"
        elif source.startswith("builtin:self-instruct"):
            data += (
                " (kvplan's copy of the human-written Self-Instruct prompts, Apache-2.0; used only as calibration "
                "input: forward passes, no gradient updates)"
            )
        lines.append(data)
    amount = [f"{prov[key]:,} {label}" for key, label in (("num_samples", "sequences"), ("num_tokens", "tokens"))
              if isinstance(prov.get(key), int)]
    if isinstance(prov.get("seed"), int):
        amount.append(f"seed {prov['seed']}")
    if amount:
        lines.append("- " + ", ".join(amount))
    if isinstance(plan.recipe.get("model"), str):  # a recipe python -m calibrate resolved
        lines.append(
            "- `recipe.yaml` beside the plan is the resolved calibration recipe: "
            "`python -m calibrate <model> --recipe recipe.yaml --out plan.safetensors` recalibrates with it."
        )
    elif plan.recipe:
        lines.append("- `recipe.yaml` beside the plan holds the plan's recipe.")
    return lines


def _body(
    plan: Plan, repo_id: str | None, results: str | None = None, revision: str | None = None,
    base_model: str | None = None,
) -> list[str]:
    fp = plan.fingerprint
    loaded = _loaded_from(plan)
    base_revision = fp.get("revision")
    lines = [f"# KV-cache plan for {base_model or loaded}", ""]
    if base_model is not None and base_model != loaded:
        made_on = f"`{base_model}`, calibrated on `{loaded}`"
    else:
        made_on = f"`{loaded}`" + (f" (revision `{base_revision}`)" if base_revision else "")
    lines.append(
        f"A [kvplan](https://pypi.org/project/kvplan/) plan for {made_on}"
        ": offline-calibrated KV-cache compression applied at generation time. It holds no weights; "
        "load the base model as usual and apply the plan."
    )
    lines += ["", "## What it does", ""]
    lines += [f"- {spec.description}" for spec in registry.specs(plan.methods)] or ["- nothing (a no-op plan)"]
    if plan.target_ratio is not None:
        lines += ["", f"Target: keep {float(plan.target_ratio):.1%} of the full KV-cache memory."]
    if plan.params:
        lines += ["", "Parameters:", "", *_json_block(plan.params)]
    lines += ["", "## Calibration", "", *_calibration(plan, base_model)]
    if results:
        lines += ["", "## Measured", "", results.strip()]
    lines += ["", "## Per-layer plan", "", *_layer_table(plan)]
    lines += ["", "## How to load", "", *_usage(plan, repo_id, revision, base_model)]
    lines += ["", "## Provenance", "", f"Made with kvplan {plan.kvplan_version}.", "", *_json_block(plan.provenance)]
    lines += ["", "Model structure the plan was calibrated for:", "", *_json_block(fp), ""]
    return lines


def _usage(
    plan: Plan, repo_id: str | None, revision: str | None = None, base_model: str | None = None
) -> list[str]:
    fp = plan.fingerprint
    loaded = _loaded_from(plan)
    plan_revision = f', revision="{revision}"' if revision else ""
    if looks_like_repo_id(loaded):
        base_revision = f', revision="{fp["revision"]}"' if fp.get("revision") else ""
        load = ["from transformers import AutoModelForCausalLM", "import runtime", "",
                f'model = AutoModelForCausalLM.from_pretrained("{loaded}"{base_revision})']
        note = []
    else:
        # a GGUF / pypi: / local source: kvplan's loader reads it as the calibration did (a GGUF is dequantized once)
        load = ["import runtime", "from runtime.models import load_model, resolve_model_spec", "",
                f'model = load_model(resolve_model_spec("{loaded}")).model']
        hint = plan.recipe.get("install_hint")
        note = [f"`{loaded}` is what the plan was calibrated on" + (f" (`{hint}`)" if isinstance(hint, str) else "")
                + "."]
        if base_model is not None:
            note[0] += (
                f" With `AutoModelForCausalLM.from_pretrained(\"{base_model}\")` instead the plan applies too (same "
                "structure) and warns that the weights differ from the calibrated ones (its figures were measured on "
                "the weights above)."
            )
        note.append("")
    return [
        "```python",
        *load,
        f'plan = runtime.load_plan("{repo_id or "<this repo>"}"{plan_revision})',
        "runtime.apply_plan(model, plan)",
        "```",
        "",
        *note,
        "The plan is downloaded once into the HF cache. Pin it with `revision=\"<40-hex commit sha>\"` (the commit "
        "you tested); a pinned plan loads from the cache with `HF_HUB_OFFLINE=1`, without any network access.",
    ]


def render_model_card(
    plan: Plan,
    repo_id: str | None = None,
    results: str | None = None,
    *,
    revision: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
) -> str:
    """The ``README.md`` for a plan repo: YAML front matter (base_model, tags, ...) and a short body.

    ``results``: markdown of measured figures (fidelity, memory, speed and the commands that printed them), shown
    under "Measured"; the card states nothing measured without it. ``revision``: the plan repo's branch the card
    is pushed to (shown in the usage snippet). ``license``: the card's license (default: the recipe's, if any).
    ``base_model``: the Hub repo id of the model the plan is for (default: the recipe's ``base_model``, else the
    calibrated model's name when it is a repo id); needed when the plan was calibrated on a GGUF or local copy.
    """
    base = _base_model(plan, base_model)
    body = "\n".join(_body(plan, repo_id, results, revision, base))
    card = ModelCard(f"---\n{_card_data(plan, license, base).to_yaml()}\n---\n\n" + body)
    return str(card)


def write_plan_folder(
    plan: Plan,
    folder: str | Path,
    repo_id: str | None = None,
    results: str | None = None,
    *,
    revision: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Write ``plan.safetensors``, ``recipe.yaml`` and ``README.md`` into ``folder`` (validates the plan)."""
    folder = Path(folder)
    plan.save(folder / DEFAULT_FILENAME)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(plan.recipe, sort_keys=True), encoding="utf-8")
    card = render_model_card(plan, repo_id, results, revision=revision, license=license, base_model=base_model)
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder


# ----------------------------------------------------------------------------------------------------------
# Upload
# ----------------------------------------------------------------------------------------------------------


def _push_error(exc: Exception, repo_id: str, revision: str | None, endpoint: str) -> PlanError:
    """Translate a huggingface_hub upload failure into a PlanError that says what to do."""
    status = _http_status(exc)
    if isinstance(exc, hub_errors.OfflineModeIsEnabled):
        todo = "offline mode is on (HF_HUB_OFFLINE=1): unset it to push"
    elif status == 401:
        todo = f"the Hub did not accept your credentials: {_LOGIN_HINT} (a token with write access)"
    elif status == 403:
        todo = f"your token may not write to {repo_id}: check the namespace and that the token has write access"
    elif isinstance(exc, hub_errors.RevisionNotFoundError):
        todo = f"the branch {revision!r} does not exist and could not be created: check its name"
    elif isinstance(exc, hub_errors.RepositoryNotFoundError):
        todo = f"check the repo id and that your token may write to {repo_id}"
    elif isinstance(exc, hub_errors.HfHubHTTPError):
        todo = f"the Hub answered HTTP {status}: fix what it says and push again"
    elif isinstance(exc, OSError) or any(word in type(exc).__name__ for word in ("Connect", "Timeout")):
        todo = "check the network (and HF_ENDPOINT)"
    else:
        todo = "fix what it says and push again"
    detail = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    return PlanError(f"could not push the plan to {endpoint}/{repo_id}: {type(exc).__name__}: {detail}; {todo}")


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
    license: str | None = None,
    base_model: str | None = None,
) -> str:
    """Upload ``plan`` with its recipe and model card to Hub repo ``repo_id``; returns the commit sha.

    ``revision`` names a branch (created from ``main`` if missing). ``private`` applies when the repo is created.
    ``api`` defaults to ``HfApi(token=token)``. ``results``: markdown of measured figures for the card (see
    :func:`render_model_card`); ``license``, ``base_model``: the card's (see :func:`render_model_card`). An invalid plan raises :class:`PlanError` before
    any request; a failed upload raises :class:`PlanError` saying what to do.
    """
    if not looks_like_repo_id(repo_id):
        raise PlanError(f"{repo_id!r} is not a Hub repo id like 'org/name'")
    api = api if api is not None else HfApi(token=token)
    message = commit_message or f"Upload kvplan plan ({', '.join(plan.methods) or 'no-op'})"
    with tempfile.TemporaryDirectory(prefix="kvplan-push-") as folder:
        write_plan_folder(plan, folder, repo_id, results, revision=revision, license=license, base_model=base_model)
        try:
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
        # As for downloads, the transport library's own errors are possible besides huggingface_hub's.
        except Exception as exc:  # noqa: BLE001
            raise _push_error(exc, repo_id, revision, str(getattr(api, "endpoint", constants.ENDPOINT))) from exc
    return str(info.oid)
