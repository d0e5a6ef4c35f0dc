"""The shipped ``--methods all`` plans: each loads, fits SmolLM2-135M, and its card states what the eval prints now.

Each ``artifacts/smollm2-135m-all-*x/`` folder was written by ``bench/plan_card.py make``: the plan, the eval JSONs
its card is rendered from, and the card. This test re-runs the same evaluation (the settings recorded in the JSONs,
on the same held-out essays, rebuilt here by ``bench/eval_texts.py``) for every shipped plan at once (the full cache
runs once) and compares. Tolerances: the figures are deterministic on one machine; across transformers/torch builds
and CPUs float summation order may move a KL in its last digits or flip a near-tie top-1 token, so KL may differ by
10 % (+0.0005 absolute), top-1 agreement and the perplexity ratio by 0.02, the bytes held by 1 %, and each passkey
protocol by one case.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import requires_smollm2

import runtime
from runtime import hub
from runtime.evaluation import EvalSettings, evaluate, full_cache, plan_method

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench import eval_texts, plan_card  # noqa: E402

SHIPPED = sorted(p for p in (REPO / "artifacts").glob("smollm2-135m-all-*x") if p.is_dir())

pytestmark = [requires_smollm2, pytest.mark.smollm2, pytest.mark.slow]


def test_three_plans_are_shipped():
    assert [p.name for p in SHIPPED] == ["smollm2-135m-all-2x", "smollm2-135m-all-4x", "smollm2-135m-all-8x"]
    for folder in SHIPPED:
        for name in ("plan.safetensors", "recipe.yaml", "README.md", "inspect.png", "measured.json",
                     *plan_card.EVAL_FILES.values()):
            assert (folder / name).is_file(), f"{folder.name}/{name} is missing"
        plan = runtime.load_plan(folder)
        assert set(plan.methods) >= {"pyramidinfer", "kvcompress"}, plan.methods
        ratio = {"2x": 0.5, "4x": 0.25, "8x": 0.125}[folder.name.rsplit("-", 1)[1]]
        assert float(plan.target_ratio) == pytest.approx(ratio)


def test_cards_are_rendered_from_their_figures():
    for folder in SHIPPED:
        card = (folder / "README.md").read_text(encoding="utf-8")
        plan = runtime.load_plan(folder)
        meta = json.loads((folder / "measured.json").read_text(encoding="utf-8"))  # base_model / license given once
        expected = hub.render_model_card(plan, results=None, base_model=meta.get("base_model"),
                                         license=meta.get("license"))
        assert card.startswith(expected.split("## What it does")[0]), folder.name  # same front matter and title
        assert plan_card.measured_markdown(folder) in card, f"{folder.name}: README.md is stale (run render)"


@pytest.fixture(scope="module")
def smollm2():
    from calibrate.recipe import resolve_recipe
    from runtime.models import load_model

    loaded = load_model(resolve_recipe("smollm2-135m"), progress=False)
    return loaded.model, loaded.tokenizer


def _close_kl(now: float, card: float) -> bool:
    return abs(now - card) <= 0.1 * card + 0.0005


def test_card_figures_are_what_the_eval_prints_now(smollm2, tmp_path):
    model, tokenizer = smollm2
    eval_texts.main(["--out", str(tmp_path)])
    data = str(tmp_path / "essays_b")
    plans = {folder.name: runtime.load_plan(folder) for folder in SHIPPED}
    for plan in plans.values():
        plan.validate(model)
    methods = [full_cache(), *(plan_method(plan, name=name) for name, plan in plans.items())]
    cards = {folder.name: plan_card.figures(folder) for folder in SHIPPED}
    reports = {}
    for protocol, filename in plan_card.EVAL_FILES.items():
        recorded = json.loads((SHIPPED[0] / filename).read_text())["settings"]
        for folder in SHIPPED[1:]:  # one run serves every plan only if they were measured alike
            assert json.loads((folder / filename).read_text())["settings"] == recorded
        reports[protocol] = evaluate(model, tokenizer, methods, data, EvalSettings(**recorded))
    problems = []
    for name, card in cards.items():
        lm = plan_card._row(reports["context_first"], "lm", name)
        checks = [
            ("lm_top1", lm["top1_agreement"], abs(lm["top1_agreement"] - card["lm_top1"]) <= 0.02),
            ("lm_kl", lm["kl"], _close_kl(lm["kl"], card["lm_kl"])),
            ("lm_ppl_ratio", lm["ratio"], abs(lm["ratio"] - card["lm_ppl_ratio"]) <= 0.02),
            ("physical_bytes", lm["physical_bytes"],
             abs(lm["physical_bytes"] - card["physical_bytes"]) <= 0.01 * card["physical_bytes"]),
        ]
        for protocol, report in reports.items():
            row = plan_card._row(report, "passkey", name)
            cases = card[f"passkey_{protocol}_cases"]
            checks.append((f"passkey_{protocol}", row["score"],
                           abs(row["score"] - card[f"passkey_{protocol}"]) * cases <= 1 + 1e-9))
        problems += [f"{name}: {key} now {now} vs card {card[key]}" for key, now, ok in checks if not ok]
    assert not problems, "\n".join(problems)
