"""Ship a plan: a Hub-layout folder with the plan, its measured model card and its ``inspect`` picture.

    python bench/plan_card.py make --plan plan.safetensors --out artifacts/smollm2-135m-all-4x \
        --data .scratch/eval/essays_b
    python bench/plan_card.py render artifacts/smollm2-135m-all-4x     # re-render README.md from the JSONs

``make`` writes into ``--out`` (the layout ``runtime.hub.push_plan`` uploads, so the folder can be pushed as is or
loaded with ``runtime.load_plan(folder)``):

- ``plan.safetensors``, ``recipe.yaml``;
- ``inspect.png`` / ``inspect.json``: ``python -m runtime inspect`` (theoretical bytes at 2,048 tokens);
- ``eval-context-first.json``: ``python -m runtime eval`` (lm: KL, top-1, perplexity ratio and the physical bytes
  held; passkeys with the context compressed before the question is seen, kvpress's protocol);
- ``eval-question-in-prefill.json``: the passkeys again with the question in the prefill (``generate(prompt)``);
- ``generate.json``: ``python -m runtime generate`` (decode speed at batch 1 vs the stock cache, best of two
  interleaved rounds: run it on a quiet machine; ``--no-speed`` skips it);
- ``measured.json``: the commands that wrote each JSON, and where the evaluation text came from;
- ``README.md``: the model card (``runtime.hub.render_model_card``) with a "Measured" section built from the JSONs
  above (:func:`measured_markdown`) and the calibration's own split/joint tables from the plan's provenance.

Every figure in the card is read from those JSONs; ``tests/test_shipped_plans.py`` re-runs the evaluation and checks
that the card's figures are what the eval prints now.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import runtime  # noqa: E402
from runtime import hub, registry  # noqa: E402

MIB = 2**20
DEPTHS = ("0.1", "0.3", "0.5", "0.7", "0.9")
EVAL_FILES = {"context_first": "eval-context-first.json", "question_in_prefill": "eval-question-in-prefill.json"}
DATA_NOTE = ("2,048-token windows of the reporting half of the essays (`python bench/eval_texts.py --out "
             ".scratch/eval` → `essays_b`: the last 20 of the 39 Paul Graham essays in `../shared/data`); the plan "
             "was calibrated on the built-in self-instruct prompts, and no setting was tuned on this half")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def eval_commands(folder: str, data: str, docs: int = 8, trials: int = 2) -> dict[str, list[str]]:
    """The two ``runtime eval`` command lines whose JSONs hold the card's fidelity figures."""
    common = ["--data", data, "--context", "2048", "--docs", str(docs), "--depths", *DEPTHS,
              "--trials", str(trials), "-q"]
    return {
        "context_first": ["-m", "runtime", "eval", "--plan", folder, "--tasks", "lm,passkey", *common,
                          "--json", f"{folder}/{EVAL_FILES['context_first']}"],
        "question_in_prefill": ["-m", "runtime", "eval", "--plan", folder, "--tasks", "passkey",
                                "--question-in-prefill", *common,
                                "--json", f"{folder}/{EVAL_FILES['question_in_prefill']}"],
    }


def _run(argv: list[str]) -> str:
    """Run ``python <argv>`` from the repository root; returns the command line (for the card)."""
    command = "python " + shlex.join(argv)
    log(command)
    subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    return command


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


# ----- figures -------------------------------------------------------------------------------------------------------
def _row(report: dict, task: str, method: str) -> dict:
    for row in report["rows"]:
        if row["task"] == task and row["method"] == method:
            return row
    raise KeyError(f"no {task} row for {method}")


def figures(folder: Path) -> dict:
    """The card's figures, read from the folder's eval JSONs (the plan is ``methods[1]``, the full cache ``[0]``)."""
    first = json.loads((folder / EVAL_FILES["context_first"]).read_text())
    qip = json.loads((folder / EVAL_FILES["question_in_prefill"]).read_text())
    full, plan = first["methods"][0], first["methods"][1]
    lm = _row(first, "lm", plan)
    lm_full = _row(first, "lm", full)
    out = {
        "lm_top1": lm["top1_agreement"], "lm_kl": lm["kl"], "lm_ppl_ratio": lm["ratio"], "lm_ppl": lm["score"],
        "lm_ppl_full": lm["full_score"],
        "physical_bytes": lm["physical_bytes"], "store_bytes": lm["store_bytes"], "stock_bytes": lm["stock_bytes"],
        "physical_over_stock": lm["physical_over_stock"], "full_physical_bytes": lm_full["physical_bytes"],
        "values_read_fraction": lm.get("values_read_fraction"),
    }
    for protocol, report in (("context_first", first), ("question_in_prefill", qip)):
        row = _row(report, "passkey", report["methods"][1])
        out[f"passkey_{protocol}"] = row["score"]
        out[f"passkey_{protocol}_full"] = row["full_score"]
        out[f"passkey_{protocol}_retention"] = row["retention"]
        out[f"passkey_{protocol}_cases"] = len(report["settings"]["depths"]) * report["settings"]["trials"]
    return out


def _hits(fraction: float, cases: int) -> str:
    return f"{round(fraction * cases)}/{cases}"


def measured_markdown(folder: Path) -> str:
    """The card's "Measured" section: every figure from the folder's JSONs, with the commands that printed them."""
    meta = json.loads((folder / "measured.json").read_text())
    first = json.loads((folder / EVAL_FILES["context_first"]).read_text())
    f = figures(folder)
    settings = first["settings"]
    batch, docs, cont = min(settings["batch_size"], settings["docs"]), settings["docs"], settings["continuation"]
    seen = settings["contexts"][0] + cont - 1
    with_model = f["physical_bytes"] - f["store_bytes"]
    lines = [
        f"On `{meta['model']}` ({meta['environment']}). Text: {DATA_NOTE}.",
        "",
        "| measure | full cache | this plan |",
        "|---|---|---|",
        f"| KV bytes held, all stores ({batch} rows × {seen} tokens seen) | {f['full_physical_bytes'] / MIB:.1f} MiB "
        f"| {f['physical_bytes'] / MIB:.1f} MiB (**{f['physical_over_stock']:.3f}** of stock) |",
        f"| … with the model / in the KCache value store | {f['full_physical_bytes'] / MIB:.1f} / 0 MiB "
        f"| {with_model / MIB:.1f} / {f['store_bytes'] / MIB:.1f} MiB |",
    ]
    if f["values_read_fraction"] is not None:
        lines.append(f"| value rows a decode step reads | 1 | {f['values_read_fraction']:.3f} |")
    lines += [
        f"| top-1 agreement with the full cache ({docs} windows × {cont} teacher-forced tokens) | 1 "
        f"| **{f['lm_top1']:.3f}** |",
        f"| KL(full ‖ plan), nats per token | 0 | {f['lm_kl']:.4f} |",
        f"| perplexity (ratio plan / full) | {f['lm_ppl_full']:.3f} | {f['lm_ppl']:.3f} "
        f"(**{f['lm_ppl_ratio']:.3f}**) |",
    ]
    for protocol, title in (("context_first", "context compressed before the question is seen (kvpress's protocol)"),
                            ("question_in_prefill", "question in the prefill (`generate(prompt)`)")):
        cases = f[f"passkey_{protocol}_cases"]
        lines.append(
            f"| passkeys found, {title} | {_hits(f[f'passkey_{protocol}_full'], cases)} "
            f"| **{_hits(f[f'passkey_{protocol}'], cases)}** (retention {f[f'passkey_{protocol}_retention']:.2f}) |"
        )
    speed = folder / "generate.json"
    if speed.exists():
        g = json.loads(speed.read_text())
        sp = g["speed"]
        lines.append(
            f"| decode tokens/s, batch 1, {g['prompt_tokens']}-token prompt + {g['new_tokens']} tokens (best of 2) "
            f"| {sp['stock_decode_tok_s']:.1f} | {sp['plan_decode_tok_s']:.1f} (**{sp['decode_ratio']:.2f}×**) |"
        )
    lines += [
        "",
        "KV bytes are counted wherever they live: KCache moves value rows to a second store (on this CPU run the "
        "same memory), it does not remove them, so they count toward the ratio. Bytes are the tensors the cache "
        "really holds after the teacher-forced run (`runtime.physical_bytes`), bookkeeping included.",
        "",
        "Commands (from the repository root):",
        "",
        "```bash",
        *meta["commands"],
        "```",
    ]
    return "\n".join(lines)


def calibration_markdown(plan: runtime.Plan) -> str:
    """How the calibration chose the split: its split and joint tables, from the plan's provenance."""
    prov = plan.provenance
    lines = []
    split = prov.get("joint_split")
    if split:
        lines += ["Sharing split (PyramidInfer + KVSharer plans at the same bytes, calibration continuations):", "",
                  "| shared layers | owners' mean keep | KL | top-1 | chosen |", "|---|---|---|---|---|"]
        for row in split:
            lines.append(f"| {row['shared_layers']} | {row['mean_keep_of_owners']:.3f} | {row['kl']:.4f} "
                         f"| {row['top1']:.3f} | {'**yes**' if row['chosen'] else ''} |")
        lines.append("")
    joint = prov.get("joint_search")
    if joint:
        lines += [f"Joint search (whole plans through the runtime; {joint['probes']} calibration retrieval probes in "
                  "both protocols):", "",
                  "| stage | candidate | KL | top-1 | probe retention | top-N ÷ context (calibration length) | chosen |",
                  "|---|---|---|---|---|---|---|"]
        for row in joint["rows"]:
            if row.get("scored") is False:
                lines.append(f"| {row['stage']} | {row['candidate']} | not scored (time limit) | | | | |")
                continue
            ret, read = row.get("retention"), row.get("values_read")
            lines.append(
                f"| {row['stage']} | {row['candidate']} | {row['kl']:.4f} | {row['top1']:.3f} "
                f"| {'–' if ret is None else f'{ret:.3f}'} | {'–' if read is None else f'{read:.3f}'} "
                f"| {'**yes**' if row.get('chosen') else ''} |"
            )
        tolerance = joint.get("kcache_tolerance")
        if any(row["stage"] == "kcache" for row in joint["rows"]):
            if tolerance is not None:
                lines.append(f"KCache: tolerance {tolerance:g} (chosen above).")
            else:
                recipe = registry.get("kcache").resolve_args(plan.recipe.get("kcache", {}))["tolerance"]
                lines.append(f"KCache: the recipe's tolerance {recipe:g} (no tolerance was scored within the time "
                             "limit: KCache as calibrated).")
        lines.append("")
    timing = {k: prov.get(k) for k in ("calibration_seconds", "kvsharer_search_seconds", "joint_search_seconds")
              if prov.get(k) is not None}
    if timing:
        lines.append("Calibration time (seconds, model load excluded): "
                     + ", ".join(f"{k.replace('_seconds', '').replace('_', ' ')} {v:.0f}" for k, v in timing.items())
                     + ".")
    return "\n".join(lines)


def render(folder: Path, base_model: str | None = None, license: str | None = None) -> str:
    """Re-render the card; ``base_model`` / ``license`` (given once) are kept in ``measured.json`` for later renders."""
    plan = runtime.load_plan(folder)
    meta_file = folder / "measured.json"
    meta = json.loads(meta_file.read_text())
    for key, value in (("base_model", base_model), ("license", license)):
        if value is not None and meta.get(key) != value:
            meta[key] = value
            meta_file.write_text(json.dumps(meta, indent=2) + "\n")
    results = measured_markdown(folder)
    made = ["", "## How it was made", "", "```bash", meta["calibrate_command"], "```", "",
            calibration_markdown(plan), "", "![the plan](inspect.png)"]
    text = hub.render_model_card(plan, results=results + "\n" + "\n".join(made),
                                 base_model=meta.get("base_model"), license=meta.get("license"))
    (folder / "README.md").write_text(text, encoding="utf-8")
    return text


# ----- CLI -----------------------------------------------------------------------------------------------------------
def make(args) -> None:
    folder = args.out
    plan = runtime.load_plan(args.plan)
    folder.mkdir(parents=True, exist_ok=True)
    hub.write_plan_folder(plan, folder)  # plan.safetensors, recipe.yaml (README.md is rewritten below)
    rel, data = _rel(folder), _rel(args.data)
    commands = [_run(["-m", "runtime", "inspect", rel, "--context", "2048", "--png", f"{rel}/inspect.png",
                      "--json", f"{rel}/inspect.json", "-q"])]
    commands += [_run(argv) for argv in eval_commands(rel, data, args.docs, args.trials).values()]
    if args.speed:
        argv = ["-m", "runtime", "generate", "--plan", rel, "--json", f"{rel}/generate.json", "-q"]
        commands.append(_run(argv) + "   # quiet machine: decode speed")
    import platform

    import torch
    import transformers

    meta = {
        "model": plan.fingerprint.get("name_or_path") or plan.fingerprint.get("model_type"),
        "environment": f"{plan.recipe.get('dtype', 'float32')} on {plan.recipe.get('device', 'cpu')}, "
                       f"{torch.get_num_threads()} threads; kvplan {plan.kvplan_version}, transformers "
                       f"{transformers.__version__}, torch {torch.__version__}, Python {platform.python_version()}",
        "data": data,
        "calibrate_command": args.calibrate_command or "# the calibrate command was not given (--calibrate-command)",
        "commands": commands,
    }
    (folder / "measured.json").write_text(json.dumps(meta, indent=2) + "\n")
    render(folder, args.base_model, args.license)
    log(f"wrote {folder}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="measure a plan and write its folder (plan, JSONs, picture, model card)")
    m.add_argument("--plan", required=True, help="plan file")
    m.add_argument("--out", type=Path, required=True, help="folder to write")
    m.add_argument("--data", type=Path, required=True, help="evaluation text folder (the reporting half)")
    m.add_argument("--docs", type=int, default=8, help="lm windows (default: %(default)s)")
    m.add_argument("--trials", type=int, default=2, help="passkey cases per depth, 5 depths (default: %(default)s)")
    m.add_argument("--no-speed", dest="speed", action="store_false", help="skip the decode-speed run")
    m.add_argument("--calibrate-command", help="the command that made the plan (shown in the card)")
    r = sub.add_parser("render", help="re-render README.md from the folder's JSONs")
    r.add_argument("folder", type=Path)
    for q in (m, r):
        q.add_argument("--base-model", help="Hub repo id the plan is for, when it was calibrated on a GGUF/local copy "
                                            "(default: the plan's recipe's base_model; kept for later renders)")
        q.add_argument("--license", help="the card's license id (default: the recipe's; kept for later renders)")
    args = p.parse_args(argv)
    if args.command == "make":
        if not args.plan or not Path(args.plan).exists():
            p.error(f"--plan: no such file {args.plan}")
        make(args)
    else:
        render(args.folder, args.base_model, args.license)
    return 0


if __name__ == "__main__":
    sys.exit(main())
