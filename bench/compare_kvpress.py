"""kvplan plans vs NVIDIA kvpress presses, scored by the SAME evaluation harness (``runtime.evaluation``).

Run in the kvpress venv (``bash bench/kvpress_env.sh`` first)::

    .venv-kvpress/bin/python bench/compare_kvpress.py \
        --plan artifacts/smollm2-135m-r0.5.safetensors --plan artifacts/smollm2-135m-r0.25.safetensors \
        --plan artifacts/smollm2-135m-r0.125.safetensors \
        --json artifacts/kvpress_comparison.json --markdown artifacts/kvpress_comparison.md

Methods (``methods[0]`` is the full cache, the reference):

- ``full``: transformers' stock ``DynamicCache``;
- ``kvplan-pyramidinfer@<ratio>``: each ``--plan`` (``runtime.evaluation.plan_method``);
- ``kvpress-<press>@<keep>``: each ``--presses`` press at each ``--ratios`` keep ratio, applied through
  ``bench.kvpress_presses.apply_press(model, press_for(press, keep))`` (prefill compressed, later tokens exact,
  positions continued from the tokens seen: kvpress's own pipeline protocol).

Tasks (``--tasks``): ``lm`` (teacher-forced continuation after a compressed context: top-1 agreement with the full
cache, KL(full || method), perplexity ratio) and ``passkey`` (exact match and retention). Retrieval uses the
harness default: the context is compressed BEFORE the question is seen (kvpress's protocol).

Memory: the physical bytes of the cache after the first lm batch (``runtime.physical_bytes``: keys + values of every
stock layer, everything a kvplan layer holds). They are divided by the stock bytes for the tokens the cache has
SEEN (batch x (context + continuation - 1)), computed here, not taken from the harness row: the harness derives the
seen count from ``cache.get_seq_length()``, which for a kvpress-compressed ``DynamicCache`` is the physical length
(the harness row's ``physical_over_stock`` is then ~1 for every dropping press). Whether a press drops or masks is
read from the cache the harness actually used (``bench.kvpress_presses.cache_report``), not assumed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import runtime  # noqa: E402
from runtime.evaluation import EvalSettings, Method, evaluate, full_cache, plan_method, render  # noqa: E402

from bench.kvpress_presses import (  # noqa: E402  (kvpress itself is imported lazily, inside press_for)
    KVPRESS_VERSION,
    PRESSES,
    apply_press,
    cache_report,
    compression_ratio_for,
    held_bytes,
    held_lengths,
    press_for,
)

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "paul_graham_essays"
DEFAULT_PRESSES = "pyramidkv,snapkv,adakv-snapkv,streamingllm,knorm,keydiff,expected-attention"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----- methods -------------------------------------------------------------------------------------------------------
class Recorder:
    """Per method: wall time spent under ``applied``, and a snapshot of the first cache it ran (the first lm batch).

    The snapshot is taken while the method is still applied (so a head-wise press's ``masked_key_indices`` are
    still on the attention modules), from the cache the harness passed to the model.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.first: dict[str, dict[str, Any]] = {}
        self.split_chunks = 0  # chunks fed token by token by _split_ragged_chunks

    def _timed(self, label: str, start: float) -> None:
        self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
        self.calls[label] = self.calls.get(label, 0) + 1

    def wrap(self, method: Method) -> Method:
        """``method`` with its time recorded (full cache and plans)."""
        recorder = self

        @contextlib.contextmanager
        def applied(model):
            caches: list = []

            def grab(module, args, kwargs):  # the harness passes the cache by keyword
                cache = kwargs.get(runtime.cache.cache_argument(model))
                if cache is not None and not caches:
                    caches.append(cache)

            hook = model.register_forward_pre_hook(grab, with_kwargs=True)
            start = time.perf_counter()
            try:
                with method.applied(model):
                    yield
                    if method.name not in recorder.first and caches:
                        cache = caches[0]
                        recorder.first[method.name] = {
                            "seen_tokens": cache.get_seq_length(),
                            "held_tokens": runtime.kept_lengths(cache),
                            "held_bytes": held_bytes(cache),
                            "masked": False,
                        }
            finally:
                hook.remove()
                recorder._timed(method.name, start)

        return Method(name=method.name, applied=applied, plan=method.plan,
                      compresses_questions=method.compresses_questions)

    def press(self, press: str, keep: float) -> Method:
        """kvpress ``press`` at keep ratio ``keep``: ``apply_press(model, press_for(press, keep))``, recorded."""
        label = f"kvpress-{press}@{keep:g}"
        recorder = self

        @contextlib.contextmanager
        def applied(model):
            start = time.perf_counter()
            try:
                with apply_press(model, press_for(press, keep)) as handle, _split_ragged_chunks(model, recorder):
                    yield handle
                    if label not in recorder.first:
                        caches = list(handle._seen.keys())  # the caches this prefill/decode ran on (one here)
                        if caches:
                            report = handle.report(caches[0])
                            report["held_tokens"] = held_lengths(caches[0])
                            recorder.first[label] = report
            finally:
                recorder._timed(label, start)

        return Method(name=label, applied=applied, compresses_questions=False)


@contextlib.contextmanager
def _split_ragged_chunks(model, recorder: Recorder):
    """Feed a multi-token chunk one token at a time when the cache's layers hold different numbers of tokens.

    After a press whose per-layer budgets differ (PyramidKV), transformers builds ONE causal mask for a chunk, sized
    from layer 0's length, and SDPA fails on every layer that holds fewer tokens ("size of tensor a must match").
    Single-token steps need no mask, and feeding a chunk token by token is the same causal computation. This runs
    inside the model's forward, after ``apply_press``'s pre-hook gave the chunk its ``position_ids``; uniform caches
    (every other press) are not touched.
    """
    original = model.forward  # the bound class method (no instance attribute is set yet)
    name = runtime.cache.cache_argument(model)

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get(name)
        if ids is None or ids.shape[1] < 2 or cache is None or cache.get_seq_length() == 0 \
                or kwargs.get("attention_mask") is not None or len(set(held_lengths(cache))) < 2:
            return original(*args, **kwargs)
        rest = dict(kwargs)
        rest.pop("input_ids", None)
        positions = rest.pop("position_ids", None)
        out = None
        for i in range(ids.shape[1]):
            step = dict(rest)
            if positions is not None:
                step["position_ids"] = positions[:, i : i + 1]
            out = original(ids[:, i : i + 1], *args[1:], **step)
        recorder.split_chunks += 1
        return out

    model.forward = forward
    try:
        yield
    finally:
        del model.forward  # back to the class method


def plan_label(plan: runtime.Plan, path: str) -> str:
    if plan.target_ratio is None:
        return f"kvplan-{'+'.join(plan.methods) or 'none'}@{Path(path).stem}"
    return f"kvplan-{'+'.join(plan.methods) or 'none'}@{float(plan.target_ratio):g}"


# ----- summary -------------------------------------------------------------------------------------------------------
def summarize(report: dict, recorder: Recorder, kinds: dict[str, dict[str, Any]], model, args) -> list[dict]:
    """One row per method: lm and passkey scores, physical bytes vs stock for the tokens seen, drop/mask."""
    dtype = next(model.parameters()).dtype
    batch = min(args.batch_size, args.docs)
    seen_lm = args.context + args.continuation - 1  # teacher_forced feeds continuation tokens 0..C-2
    stock = runtime.stock_bytes(model.config, seen_lm, batch, dtype)
    per_token_all_layers = runtime.stock_bytes(model.config, 1, 1, dtype)
    rows = []
    for name in report["methods"]:
        kind = kinds[name]
        row: dict[str, Any] = {"method": name, **kind}
        lm = next((r for r in report["rows"] if r["task"] == "lm" and r["method"] == name), None)
        if lm is not None:
            row.update(
                lm_top1=lm.get("top1_agreement"), lm_kl=lm.get("kl"), lm_ppl_ratio=lm.get("ratio"),
                lm_ppl=lm.get("score"), lm_ppl_full=lm.get("full_score"),
                physical_bytes=lm["physical_bytes"], stock_bytes=stock, lm_seen_tokens=seen_lm, lm_batch=batch,
                physical_over_stock=lm["physical_bytes"] / stock,
                harness_physical_over_stock=lm["physical_over_stock"],
                decode_tok_s=lm.get("decode_tok_s"),
            )
            keep = kind.get("keep_ratio")
            if keep is not None:
                # what keeping `keep` of the context (kvpress: int(T * keep) per layer and head) and every
                # decoded token would hold
                expected_tokens = max(1, int(args.context * keep)) + args.continuation - 1
                row["expected_bytes_at_ratio"] = expected_tokens * per_token_all_layers * batch
                row["physical_over_expected"] = lm["physical_bytes"] / row["expected_bytes_at_ratio"]
        pk = next((r for r in report["rows"] if r["task"] == "passkey" and r["method"] == name), None)
        if pk is not None:
            row.update(passkey_accuracy=pk["score"], passkey_retention=pk["retention"], passkey_grid=pk["grid"])
        snap = recorder.first.get(name)
        if snap is not None:
            held = snap["held_tokens"]
            decoded = (snap["seen_tokens"] or seen_lm) - args.context
            eff = snap.get("effective_kept") or [float(h) for h in held]
            row["cache_snapshot"] = {k: v for k, v in snap.items() if k != "effective_kept_range"}
            row["held_context_fraction"] = (sum(held) / len(held) - decoded) / args.context
            row["effective_context_fraction"] = (sum(eff) / len(eff) - decoded) / args.context
            row["held_bytes_storage"] = snap["held_bytes"]
            if kind["evicts"] != "none":
                row["evicts"] = "masks" if snap.get("masked") else "drops"
        row["seconds"] = recorder.seconds.get(name)
        row["applied_calls"] = recorder.calls.get(name)
        rows.append(row)
    return rows


def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render_summary(rows: list[dict], args, env: dict) -> str:
    mib = 2**20
    batch = min(args.batch_size, args.docs)
    n_cases = len(args.depths) * args.trials
    lines = [
        "# kvplan vs kvpress on SmolLM2-135M",
        "",
        f"One harness (`runtime.evaluation.evaluate`) for every method; kvpress {env['kvpress']}, transformers "
        f"{env['transformers']}, torch {env['torch']}, {env['dtype']} on {env['device']}, {env['threads']} threads, "
        f"seed {args.seed}. Data: `{args.data}`.",
        "",
        f"- **lm**: {args.docs} windows x ({args.context} context tokens prefilled under the method + "
        f"{args.continuation} teacher-forced tokens); top-1 agreement and KL(full ‖ method) of the next-token "
        f"distributions over the {args.continuation} continuation positions, perplexity ratio method/full.",
        f"- **passkey**: context {args.context}, depths {', '.join(f'{d:g}' for d in args.depths)} x {args.trials} "
        f"trial(s) = {n_cases} case(s), greedy {args.answer_tokens} tokens, exact match; retention = hits among the "
        f"cases the full cache solves. **Retrieval protocol: "
        + ("the question is in the prefill (context and question compressed together, as generate(prompt) does)."
           if args.question_in_prefill else
           "the context is compressed before the question is seen (harness default, kvpress's own pipeline "
           "protocol); the question and the answer are then fed uncompressed for kvpress, while kvplan plans keep "
           "compacting while decoding.") + "**",
        f"- **Memory**: physical bytes of the cache after the first lm batch ({batch} rows x "
        f"{args.context + args.continuation - 1} tokens seen), `runtime.physical_bytes` (keys + values of stock "
        f"layers; everything a kvplan layer holds, bookkeeping included); phys/stock = divided by a stock cache "
        f"for the tokens seen; phys/expected = divided by keeping `keep` of the context plus every decoded token. "
        f"**evicts**: `drops` = tokens removed from the tensors, `masks` = tensors stay full size and evicted "
        f"entries are hidden from attention (physical memory is NOT saved); read from the cache the harness used. "
        f"effective kept = fraction of the context attention can still see (mean over layers and KV heads).",
        "",
        "| method | keep | evicts | lm top-1 | lm KL | ppl ratio | passkey acc | passkey retention "
        "| KV physical MiB | phys/stock | phys/expected | effective kept | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        phys = r.get("physical_bytes")
        lines.append(
            f"| {r['method']} | {_f(r.get('keep_ratio'), 3) if r.get('keep_ratio') is not None else '1'} "
            f"| {r['evicts']} | {_f(r.get('lm_top1'))} | {_f(r.get('lm_kl'), 4)} | {_f(r.get('lm_ppl_ratio'))} "
            f"| {_f(r.get('passkey_accuracy'), 2)} | {_f(r.get('passkey_retention'), 2)} "
            f"| {_f(phys / mib if phys is not None else None, 2)} | {_f(r.get('physical_over_stock'))} "
            f"| {_f(r.get('physical_over_expected'))} | {_f(r.get('effective_context_fraction'))} "
            f"| {_f(r.get('seconds'), 0)} |"
        )
    full = rows[0]
    lines += [
        "",
        f"Full cache: lm perplexity {_f(next((r['lm_ppl_full'] for r in rows if r.get('lm_ppl_full')), None), 3)}; "
        f"passkey accuracy "
        f"{_f(full.get('passkey_accuracy'), 2)}. `s` = wall seconds spent under the method over both tasks.",
    ]
    return "\n".join(lines) + "\n"


# ----- CLI -----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="kvplan plans vs kvpress presses on SmolLM2-135M through the same evaluation harness "
        "(lm fidelity, passkey retrieval, physical KV bytes). Run with .venv-kvpress/bin/python.",
    )
    p.add_argument("--model", default="smollm2-135m", help="kvplan recipe alias (default: %(default)s)")
    p.add_argument("--plan", action="append", default=[], help="kvplan plan file (repeatable)")
    p.add_argument("--presses", default=DEFAULT_PRESSES,
                   help=f"comma list of presses (known: {', '.join(PRESSES)}; empty: none; default: %(default)s)")
    p.add_argument("--ratios", default="0.5,0.25,0.125",
                   help="comma list of KEEP ratios for the presses (kvpress compression_ratio = 1 - keep; "
                   "default: %(default)s)")
    p.add_argument("--tasks", default="lm,passkey", help="comma list of harness tasks (default: %(default)s)")
    p.add_argument("--context", type=int, default=2048, help="context tokens (default: %(default)s)")
    p.add_argument("--docs", type=int, default=4, help="lm windows (default: %(default)s)")
    p.add_argument("--continuation", type=int, default=32, help="teacher-forced lm tokens (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="lm batch size (default: %(default)s)")
    p.add_argument("--trials", type=int, default=1, help="passkey trials per depth (default: %(default)s)")
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9],
                   help="passkey depths (default: %(default)s)")
    p.add_argument("--question-in-prefill", action="store_true",
                   help="retrieval: prefill context and question together (generate(prompt)); default: the context "
                   "is compressed before the question is seen (kvpress's protocol)")
    p.add_argument("--answer-tokens", type=int, default=10, help="greedy answer tokens (default: %(default)s)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="evaluation text (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    p.add_argument("--markdown", type=Path, default=None, help="write the markdown report here")
    args = p.parse_args(argv)
    args.press_names = [n.strip() for n in args.presses.split(",") if n.strip()]
    unknown = [n for n in args.press_names if n not in PRESSES]
    if unknown:
        p.error(f"unknown press(es) {unknown}; known: {', '.join(PRESSES)}")
    try:
        args.keep_ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
        for keep in args.keep_ratios:
            compression_ratio_for(keep)
    except ValueError as exc:
        p.error(f"--ratios: {exc}")
    args.task_names = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    for name in ("context", "docs", "continuation", "batch_size", "trials", "answer_tokens", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import importlib.metadata

    import transformers
    from runtime.models import load_model
    from calibrate.recipe import resolve_recipe

    started = time.perf_counter()
    log(f"loading {args.model}")
    loaded = load_model(resolve_recipe(args.model), progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    env = {
        "kvpress": importlib.metadata.version("kvpress"),
        "kvpress_expected": KVPRESS_VERSION,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }

    recorder = Recorder()
    methods = [recorder.wrap(full_cache())]
    kinds: dict[str, dict[str, Any]] = {"full": {"family": "full", "keep_ratio": None, "evicts": "none"}}
    for path in args.plan:
        plan = runtime.load_plan(path)
        plan.validate(model)
        label = plan_label(plan, path)
        methods.append(recorder.wrap(plan_method(plan, name=label)))
        kinds[label] = {"family": "kvplan", "plan": str(path), "keep_ratio": plan.target_ratio, "evicts": "drops"}
    for keep in args.keep_ratios:
        for press in args.press_names:
            method = recorder.press(press, keep)
            methods.append(method)
            kinds[method.name] = {"family": "kvpress", "press": press, "keep_ratio": keep,
                                  "compression_ratio": compression_ratio_for(keep), "evicts": "?"}
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise SystemExit(f"duplicate method names: {names}")
    log(f"{len(methods)} methods: {', '.join(names)}")

    settings = EvalSettings(
        contexts=[args.context], tasks=args.task_names, docs=args.docs, continuation=args.continuation,
        batch_size=args.batch_size, depths=list(args.depths), trials=args.trials, answer_tokens=args.answer_tokens,
        seed=args.seed, question_in_prefill=args.question_in_prefill,
    )
    report = evaluate(model, tokenizer, methods, str(args.data), settings)
    rows = summarize(report, recorder, kinds, model, args)
    wall = time.perf_counter() - started
    text = render_summary(rows, args, env) + f"\nTotal wall time {wall:.0f} s.\n"
    if recorder.split_chunks:
        text += (f"\n{recorder.split_chunks} multi-token chunk(s) (passkey questions) after a press whose layers hold "
                 "different numbers of tokens (PyramidKV) were fed token by token: transformers sizes one causal mask "
                 "from layer 0 and SDPA fails on the shorter layers; token-by-token is the same causal computation.\n")
    text += "\n## Harness table (as `runtime.evaluation.render` prints it)\n\n" + render(report) + "\n"
    text += ("\nNote: the harness table's phys/stock for kvpress rows uses `cache.get_seq_length()` (the physical "
             "length of a compressed DynamicCache) as the tokens seen, so it is ~1 for dropping presses; the summary "
             "above divides by the stock bytes for the tokens really seen.\n")
    print(text)
    out = {
        "command": " ".join([sys.executable, *sys.argv]),
        "environment": env,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_seconds": wall,
        "chunks_split_token_by_token": recorder.split_chunks,
        "summary": rows,
        "harness_report": report,
    }
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str))
    log(f"done in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
