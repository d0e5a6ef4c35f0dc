"""Smoke test by hand: kvpress 0.5.5 presses on SmolLM2-135M through plain forward loops (bench/kvpress_presses.py).

Run in the kvpress venv (``bash bench/kvpress_env.sh`` first)::

    .venv-kvpress/bin/python bench/kvpress_smoke.py [--keep 0.5] [--context 512] [--steps 8] [--offset 0]

One window of Paul Graham essay text (shared/data/paul_graham_essays): ``--context`` tokens are prefilled under
each press, then ``--steps`` greedy decode steps follow without further compression. Printed per press:

- kept tokens in the first and last layer after the prefill (held; for a masking press also the effective
  count, the mean over KV heads of held minus masked) and the kept fraction of the context over all layers;
- held bytes of the cache after the prefill vs a full cache (the decode steps then add the same to both);
- top-1 agreement with the full cache over the decode steps: teacher-forced (every step fed the full cache's
  greedy token, the way bench/pyramidinfer_report.py scores fidelity) and free-running (each its own greedy);
- max |logit difference| against kvpress's own pipeline protocol (``with press(model): model.model(ctx)``, then
  explicit ``position_ids = context_length + i`` outside the press): 0 means ``apply_press`` reproduces it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.kvpress_presses import PRESSES, apply_press, compression_ratio_for, held_bytes, press_for  # noqa: E402
from bench.pyramidinfer_report import DEFAULT_DATA, load_token_stream, md_table  # noqa: E402


@torch.inference_mode()
def run_full(model, context_ids, steps):
    """Stock DynamicCache: greedy tokens g0..g_steps (g0 from the prefill) and the logits of each decode step."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(context_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefill_bytes = held_bytes(cache)
    tokens = [out.logits[:, -1].argmax(-1)]
    logits = []
    for _ in range(steps):
        out = model(tokens[-1][:, None], past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1].float())
        tokens.append(logits[-1].argmax(-1))
    return torch.stack(tokens, 1), torch.stack(logits, 1), prefill_bytes


@torch.inference_mode()
def run_press_teacher_forced(model, press, context_ids, ref_tokens, steps):
    """Under apply_press: prefill, then feed the full cache's greedy tokens g0..g_{steps-1}; logits per step."""
    with apply_press(model, press) as handle:
        out = model(context_ids, use_cache=True, logits_to_keep=1)  # no cache passed: apply_press makes one
        cache = out.past_key_values
        after_prefill = handle.report(cache)
        logits = []
        for i in range(steps):
            out = model(ref_tokens[:, i : i + 1], past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1].float())
        report = handle.report(cache)
    return torch.stack(logits, 1), after_prefill, report


@torch.inference_mode()
def run_press_free(model, press, context_ids, steps):
    """Under apply_press: prefill and greedy-decode on its own tokens."""
    from transformers import DynamicCache

    with apply_press(model, press):
        cache = DynamicCache(config=model.config)
        out = model(context_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(steps):
            out = model(tokens[-1][:, None], past_key_values=cache, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1)


@torch.inference_mode()
def run_press_pipeline_protocol(model, press, context_ids, ref_tokens, steps):
    """kvpress's own protocol (KVPressTextGenerationPipeline._forward/generate_answer), teacher-forced."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with press(model):
        model.model(input_ids=context_ids, past_key_values=cache)
    context_length = context_ids.shape[1]
    logits = []
    for i in range(steps):
        position_ids = torch.tensor([[context_length + i]], device=context_ids.device)
        out = model(input_ids=ref_tokens[:, i : i + 1], past_key_values=cache, position_ids=position_ids)
        logits.append(out.logits[:, -1].float())
    for module in (layer.self_attn for layer in model.model.layers):  # kvpress leaves these; apply_press does not
        if getattr(module, "masked_key_indices", None) is not None:
            module.masked_key_indices = None
        if hasattr(module, "rotary_emb"):
            delattr(module, "rotary_emb")
    return torch.stack(logits, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5, help="kvplan keep ratio (kvpress ratio = 1 - keep)")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--offset", type=int, default=0, help="token offset of the window in the essay stream")
    parser.add_argument("--presses", default=",".join(PRESSES), help="comma list of PRESSES keys")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the dev machines have 2, shared)")
    parser.add_argument("--no-pipeline-check", action="store_true", help="skip the kvpress-pipeline comparison")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import importlib.metadata

    import transformers
    from runtime.models import load_model
    from calibrate.recipe import resolve_recipe

    loaded = load_model(resolve_recipe("smollm2-135m"), progress=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    stream = load_token_stream(DEFAULT_DATA, tokenizer)
    context_ids = stream[args.offset : args.offset + args.context][None]
    print(
        f"model {type(model).__name__} ({model.config._attn_implementation}), {model.config.num_hidden_layers} layers, "
        f"{model.config.num_key_value_heads} KV heads; kvpress {importlib.metadata.version('kvpress')}, "
        f"transformers {transformers.__version__}, torch {torch.__version__}; context {args.context} tokens at offset "
        f"{args.offset}, {args.steps} decode steps, keep {args.keep} (kvpress compression_ratio "
        f"{compression_ratio_for(args.keep)})",
        file=sys.stderr,
    )

    ref_tokens, ref_logits, full_bytes = run_full(model, context_ids, args.steps)
    seen = args.context + args.steps
    rows = []
    for name in [n.strip() for n in args.presses.split(",") if n.strip()]:
        start = time.perf_counter()
        press = press_for(name, args.keep)
        logits, report, after_decode = run_press_teacher_forced(model, press, context_ids, ref_tokens, args.steps)
        assert report["seen_tokens"] == args.context, report["seen_tokens"]
        assert after_decode["seen_tokens"] == seen, after_decode["seen_tokens"]
        assert after_decode["held_tokens"] == [n + args.steps for n in report["held_tokens"]], "decode compressed"

        agree_tf = (logits.argmax(-1) == ref_tokens[:, 1:]).float().mean().item()
        free = run_press_free(model, press_for(name, args.keep), context_ids, args.steps)
        agree_free = (free[:, 1:] == ref_tokens[:, 1:]).float().mean().item()
        if args.no_pipeline_check:
            pipe_diff = float("nan")
        else:
            pipe = run_press_pipeline_protocol(model, press_for(name, args.keep), context_ids, ref_tokens, args.steps)
            pipe_diff = (pipe - logits).abs().max().item()
        held = report["held_tokens"]
        eff = report["effective_kept"]
        kept = f"{held[0]} / {held[-1]}"
        if report["masked"]:
            (lo0, hi0), (lo1, hi1) = report["effective_kept_range"][0], report["effective_kept_range"][-1]
            kept += f" (effective {eff[0]:.0f} [{lo0}-{hi0} per head] / {eff[-1]:.0f} [{lo1}-{hi1}])"
        rows.append([
            name,
            kept,
            f"{sum(eff) / (len(eff) * args.context):.3f}",
            "masked" if report["masked"] else "dropped",
            f"{report['held_bytes'] / 2**20:.2f} MiB / {full_bytes / 2**20:.2f} MiB ({report['held_bytes'] / full_bytes:.3f})",
            f"{agree_tf * args.steps:.0f}/{args.steps}",
            f"{agree_free * args.steps:.0f}/{args.steps}",
            f"{pipe_diff:.1e}",
            f"{time.perf_counter() - start:.1f}",
        ])
        print(f"  {name}: done", file=sys.stderr, flush=True)
    # the model must come back untouched: a stock run after all the presses gives the same logits
    _, again, _ = run_full(model, context_ids, args.steps)
    same_logits = torch.equal(again, ref_logits)
    if not same_logits:
        print(f"stock rerun differs: max |dlogit| {(again - ref_logits).abs().max().item():.2e}", file=sys.stderr)
    restored = same_logits and not any(
        hasattr(layer.self_attn, "rotary_emb") or getattr(layer.self_attn, "masked_key_indices", None) is not None
        for layer in model.model.layers
    )
    print(md_table(
        ["press", "held tokens after prefill, layer 0 / last", "kept fraction of context (mean over layers)",
         "evicted tokens", "held bytes after prefill vs full", "top-1 agree (teacher-forced)", "top-1 agree (free-running)",
         "max |Δlogit| vs kvpress pipeline", "s"],
        rows,
    ))
    print(f"\nfull cache greedy continuation: {tokenizer.decode(ref_tokens[0])!r}")
    print(f"model restored after the presses (stock rerun identical, no leftover attributes): {restored}")
    return 0 if restored else 1


if __name__ == "__main__":
    sys.exit(main())
