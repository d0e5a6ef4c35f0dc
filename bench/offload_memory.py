"""Peak memory and per-layer time of a calibration, model in memory vs offloaded by accelerate (CPU + disk).

    python bench/offload_memory.py        # tiny random Llama + SmolLM2-135M: artifacts/offload_memory.{md,json,log}
    python bench/offload_memory.py --models tiny --out-prefix /tmp/om
    python bench/offload_memory.py --from-json artifacts/offload_memory.json   # the tables again, no runs

Every configuration (model x placement x calibration pass) runs in its own subprocess, so that its peak resident
memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``: the high-water mark of the whole process, model load included)
is its own. ``offloaded`` loads the model with ``device: auto`` and ``max_memory: {cpu: <a quarter of the model's
float32 bytes>}``: accelerate keeps what fits on the CPU and reads every other layer from disk at each forward
(kvplan's default offload folder). Each subprocess calibrates one method alone through ``calibrate.pipeline.calibrate``
(no joint search; KV-Compress with 4 probes, KVSharer with at most 4 candidates: ``BENCH_ARGS``) and
reports the plan's ``forward_pass_seconds`` (the observed pass over the calibration sequences) divided by layers x
sequences; ``forward`` is the same pass with no observer (the model alone). The plans of the two placements are
compared tensor by tensor.

The machine may be shared with other jobs: the times are wall times on whatever CPU time the process got. The
Llama-3-8B section scales the measured SmolLM2 per-layer costs by FLOPs (an estimate, see ``llama_estimate``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PASSES = ("forward", "pyramidinfer", "kvcompress", "kcache", "kvsharer")
PLACEMENTS = ("in-memory", "offloaded")
#: calibration data per model: (samples, tokens); small enough for a few minutes per configuration on 2 CPU cores
DATA = {"tiny": (2, 512), "smollm2-135m": (2, 1024)}
OFFLOAD_FRACTION = 0.25  # max_memory cpu = this fraction of the model's float32 bytes
#: fewer KV-Compress probes and KVSharer candidates than the recipes' (the time per layer per sequence is unchanged)
BENCH_ARGS = {"kvcompress": {"probes": 4}, "kvsharer": {"max_trials": 4}}

#: glibc grows its mmap threshold when large blocks are freed, so the weights accelerate copies out of the offload
#: folder at every forward (and frees after it) would stay in the heap: RSS kept every layer it ever loaded (measured
#: on SmolLM2, one forward: 821 MiB peak offloaded vs 962 MiB in memory by default; 562 vs 952 MiB with a fixed
#: 1 MiB threshold). Both placements run with the fixed threshold.
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "TOKENIZERS_PARALLELISM": "false"}

# Llama-3-8B (meta-llama/Meta-Llama-3-8B-Instruct config.json)
LLAMA = {"layers": 32, "heads": 32, "kv_heads": 8, "head_dim": 128, "hidden": 4096, "intermediate": 14336,
         "vocab": 128256, "seq": 4096, "samples": 32}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def layer_params(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int) -> int:
    """Weights of one Llama decoder layer (attention + gated MLP; norms left out)."""
    return hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * intermediate


def layer_flops(config: dict, tokens: int) -> float:
    """Forward FLOPs of one decoder layer over ``tokens`` (2 per weight per token, causal attention QK^T and PV)."""
    weights = layer_params(config["hidden"], config["heads"], config["kv_heads"], config["head_dim"],
                           config["intermediate"])
    return 2.0 * tokens * weights + 2.0 * tokens * tokens * config["heads"] * config["head_dim"]


# --------------------------------------------------------------------------------------------------------- worker


def _config(recipe):
    """The model's config without loading its weights (a GGUF source: the converted copy's, made if missing)."""
    from transformers import AutoConfig

    from runtime.models import _ensure_converted, default_cache_dir, resolve_model_source

    source = resolve_model_source(recipe)
    location = source.location
    if source.gguf_path is not None:
        location = str(_ensure_converted(source.gguf_path, default_cache_dir(), quiet=True)[0])
    return AutoConfig.from_pretrained(location)


def worker(model: str, placement: str, method: str, tiny_dir: str | None) -> dict:
    """One configuration, in this process: load, calibrate ``method`` alone, report times and peak memory."""
    import torch

    from calibrate.collect import run_calibration_pass
    from calibrate.data import build_calibration_set
    from calibrate.pipeline import calibrate, device_map_summary
    from calibrate.recipe import resolve_recipe
    from runtime.models import load_model

    start_rss = _rss_mib()
    samples, tokens = DATA[model]
    recipe = resolve_recipe(tiny_dir if model == "tiny" else model).with_overrides(
        num_calibration_samples=samples, max_seq_length=tokens, dtype="float32",
        methods=[method] if method != "forward" else [], method_args=BENCH_ARGS,
    )
    config = _config(recipe)
    loaded_size = None
    if placement == "offloaded":
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        with init_empty_weights():  # the model's float32 bytes from a meta-device copy (no weights loaded here)
            empty = AutoModelForCausalLM.from_config(config)
        loaded_size = sum(p.numel() * 4 for p in empty.parameters())
        recipe = recipe.with_overrides(device="auto", max_memory={"cpu": int(loaded_size * OFFLOAD_FRACTION)})
    out: dict = {"model": model, "placement": placement, "pass": method, "samples": samples, "tokens": tokens,
                 "rss_after_imports_mib": round(start_rss, 1)}
    if method == "forward":  # the model alone: the same pass, no observer
        loaded = load_model(recipe, progress=False)
        data = build_calibration_set(loaded.tokenizer, recipe, progress=False)
        seconds = run_calibration_pass(loaded.model, data.samples, [])
        model_obj, sequences, plan_tensors = loaded.model, len(data.samples), {}
        out["device_map"] = device_map_summary(model_obj)
    else:
        result = calibrate(recipe, progress=False, search_seconds=0)
        plan = result.plan
        seconds = plan.provenance["forward_pass_seconds"]
        report = result.report.get(method, {})
        sequences = {
            "pyramidinfer": samples,
            "kcache": report.get("samples", samples),
            "kvcompress": samples + int(report.get("observations_probes", 0)),
            "kvsharer": samples,
        }[method]
        if method == "kvsharer":  # the distance pass runs the first distance_tokens of each sample
            out["tokens"] = min(tokens, int(plan.provenance["kvsharer_search"]["distance_tokens"]))
            out["kvsharer_search_seconds"] = plan.provenance.get("kvsharer_search_seconds")
            out["kvsharer_trials"] = plan.provenance["kvsharer_search"]["trials"]
        out["device_map"] = plan.provenance.get("device_map")
        plan_tensors = {k: v.tolist() for k, v in plan.tensors.items()}
        model_obj = None
    layers = int(config.num_hidden_layers)
    out.update({
        "layers": layers, "sequences": sequences, "pass_seconds": round(seconds, 4),
        "seconds_per_layer_per_sequence": seconds / (layers * sequences),
        "max_memory": recipe.max_memory, "model_float32_bytes": loaded_size,
        "peak_rss_mib": round(_rss_mib(), 1), "plan_tensors": plan_tensors,
    })
    del model_obj
    _ = torch  # torch imported for the models' sake
    return out


# --------------------------------------------------------------------------------------------------------- parent


def run_all(models: list[str], log) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as temp:
        tiny_dir = None
        if "tiny" in models:
            sys.path.insert(0, str(REPO_ROOT / "tests"))
            from make_tiny_model import make_tiny_model

            tiny_dir = str(make_tiny_model(Path(temp) / "tiny", layers=8))
        for model in models:
            for method in PASSES:
                for placement in PLACEMENTS:
                    cmd = [sys.executable, __file__, "--worker", model, placement, method]
                    if tiny_dir:
                        cmd += ["--tiny-dir", tiny_dir]
                    start = time.perf_counter()
                    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env=WORKER_ENV)
                    log.write(f"$ {' '.join(cmd[1:])}  ({time.perf_counter() - start:.1f} s, rc {done.returncode})\n")
                    log.write(done.stderr[-4000:])
                    log.flush()
                    if done.returncode != 0:
                        raise SystemExit(f"worker failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
                    rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                    print(f"{model:13s} {method:12s} {placement:9s} peak {rows[-1]['peak_rss_mib']:8.1f} MiB  "
                          f"{rows[-1]['seconds_per_layer_per_sequence'] * 1000:8.2f} ms/layer/seq", file=sys.stderr)
    for row in rows:  # the plans of the two placements, tensor by tensor
        other = next(r for r in rows if r["model"] == row["model"] and r["pass"] == row["pass"]
                     and r["placement"] == "in-memory")
        row["plan_equals_in_memory"] = row["plan_tensors"] == other["plan_tensors"]
    return rows


def llama_estimate(rows: list[dict]) -> dict:
    """Llama-3-8B on one 80 GB GPU: memory from its config, time scaled from SmolLM2's measured per-layer costs.

    Time: each pass's measured in-memory seconds per layer per sequence on SmolLM2 (CPU, float32) x the FLOPs ratio
    of one Llama-3-8B layer at 4096 tokens (KVSharer: its 256 distance tokens) to one SmolLM2 layer at the measured
    length x 32 layers x 32 samples (KV-Compress: + the recipe's 16 probes) = the CPU time of the same passes on
    this machine, with this CPU's measured throughput in the plain forward (to convert to a GPU's, by assumption: the recipe's comment).
    An estimate: the observers' own work (softmaxes over cut windows, top-N sorts) does not scale exactly with the
    layer's FLOPs, and the measured times are wall times on a shared machine.
    """
    smol = {"hidden": 576, "heads": 9, "kv_heads": 3, "head_dim": 64, "intermediate": 1536}
    base = {r["pass"]: r for r in rows if r["model"] == "smollm2-135m" and r["placement"] == "in-memory"}
    if not base:
        return {}
    cfg = LLAMA
    weights = cfg["layers"] * layer_params(cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"],
                                           cfg["intermediate"]) + 2 * cfg["vocab"] * cfg["hidden"] + cfg["hidden"]
    n = cfg["seq"]
    act = {  # bf16 activations of one 4096-token sample inside one layer (the largest live at once)
        "hidden_states": n * cfg["hidden"] * 2,
        "mlp_gate_up": 2 * n * cfg["intermediate"] * 2,
        "q_k_v": n * cfg["head_dim"] * (cfg["heads"] + 2 * cfg["kv_heads"]) * 2,
    }
    observers = {  # float32 per-layer working sets of the observers (calibrate/*.py), one layer at a time
        "pyramidinfer_future_mass": cfg["kv_heads"] * (cfg["heads"] // cfg["kv_heads"]) * 64 * n * 4,
        "kcache_block": 2 ** 21 * 4 * 4,  # BLOCK_ELEMENTS float32, ~4 live temporaries
        "kvsharer_held_kv_256_tokens_all_layers": cfg["layers"] * 2 * cfg["kv_heads"] * 256 * cfg["head_dim"] * 4,
    }
    attention_map = cfg["heads"] * n * n * 4  # what a materialised [H, N, N] float32 map would take (never held)
    joint_cache = cfg["layers"] * 2 * cfg["kv_heads"] * 1088 * cfg["head_dim"] * 2  # runtime KV cache, 1088 tokens
    memory = {
        "weights_bf16": weights * 2, **act, **observers, "joint_search_kv_cache_1088": joint_cache,
        "logits_1088_tokens_float32": 1088 * cfg["vocab"] * 4,
        "one_layer_attention_map_float32_never_held": attention_map,
    }
    memory["total_needed_estimate"] = (memory["weights_bf16"] + sum(act.values()) + max(observers.values())
                                       + joint_cache + memory["logits_1088_tokens_float32"])
    passes = {}
    forward = base.get("forward")
    for name, row in base.items():
        tokens = row["tokens"] if name == "kvsharer" else n  # KVSharer's pass runs distance_tokens on any model
        ratio = layer_flops(cfg, tokens) / layer_flops(smol, row["tokens"])
        # sequences per text sample: KV-Compress adds its retrieval probes (the recipe's 16 on 32 samples)
        per_sample = (cfg["samples"] + 16) / cfg["samples"] if name == "kvcompress" else 1.0
        cpu_seconds = row["seconds_per_layer_per_sequence"] * ratio * cfg["layers"] * cfg["samples"] * per_sample
        passes[name] = {"flops_ratio": ratio, "cpu_seconds": cpu_seconds}
    cpu_flops = None
    if forward is not None:
        cpu_flops = layer_flops(smol, forward["tokens"]) / forward["seconds_per_layer_per_sequence"]
    return {"memory_bytes": memory, "passes": passes, "cpu_measured_flops_per_second": cpu_flops}


def render(rows: list[dict], estimate: dict) -> str:
    lines = ["# Calibration memory and per-layer time: in memory vs offloaded (accelerate, CPU + disk)", "",
             "`python bench/offload_memory.py` (each row its own subprocess; peak RSS = ru_maxrss of the process, "
             "model load included; every worker with `MALLOC_MMAP_THRESHOLD_=1048576`; times on a shared 2-core CPU "
             "machine, float32). Offloaded: `device: auto`, "
             f"`max_memory: {{cpu: {OFFLOAD_FRACTION:g} x the model's float32 bytes}}`, the rest read from disk.", "",
             "| model | pass | placement | device map (modules) | samples x tokens | peak RSS MiB | after imports MiB | "
             "pass s | ms / layer / sequence | plan = in-memory |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        placed = ", ".join(f"{k} {v}" for k, v in (r["device_map"] or {}).items()) or "-"
        lines.append(
            f"| {r['model']} | {r['pass']} | {r['placement']} | {placed} | {r['samples']} x {r['tokens']} "
            f"({r['sequences']} seq) | {r['peak_rss_mib']:.0f} | {r['rss_after_imports_mib']:.0f} | "
            f"{r['pass_seconds']:.2f} | {r['seconds_per_layer_per_sequence'] * 1000:.2f} | "
            f"{'yes' if r['plan_equals_in_memory'] else 'NO'} |"
        )
    sharer = [r for r in rows if r["pass"] == "kvsharer"]
    if sharer:
        lines += ["", "KVSharer's acceptance search (runs candidate plans through the runtime; not in the pass time): "
                  + "; ".join(f"{r['model']} {r['placement']}: {r['kvsharer_search_seconds']:.1f} s for "
                              f"{r['kvsharer_trials']} candidates" for r in sharer)]
    if estimate:
        mem = estimate["memory_bytes"]
        gib = lambda b: b / 2**30  # noqa: E731
        lines += ["", "## Llama-3-8B (estimate)", "",
                  "Memory, from its config (32 layers, 32 query / 8 KV heads of 128, hidden 4096, MLP 14336, vocab "
                  "128256), one 4096-token sample:", ""]
        lines += [f"- {k}: {gib(v):.3f} GiB" for k, v in mem.items()]
        lines += ["", "Time of each pass, 32 samples x 4096 tokens: SmolLM2's measured in-memory ms/layer/sequence x "
                  "FLOPs ratio (one Llama-3-8B layer at 4096 tokens / one SmolLM2 layer at the measured length) x 32 "
                  "layers x 32 samples (KV-Compress: + its 16 probes) = CPU seconds on this machine:", ""]
        for name, p in estimate["passes"].items():
            lines.append(f"- {name}: FLOPs ratio {p['flops_ratio']:.0f}, {p['cpu_seconds'] / 3600:.1f} CPU hours")
        if estimate["cpu_measured_flops_per_second"]:
            lines.append(f"- this CPU's measured throughput in the plain forward: "
                         f"{estimate['cpu_measured_flops_per_second'] / 1e9:.1f} GFLOP/s")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,smollm2-135m", help="comma list of tiny, smollm2-135m")
    p.add_argument("--out-prefix", default=str(REPO_ROOT / "artifacts" / "offload_memory"),
                   help="writes PREFIX.md, PREFIX.json and PREFIX.log")
    p.add_argument("--from-json", metavar="PATH", help="render the tables again from a saved PREFIX.json (no runs)")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "PLACEMENT", "PASS"), help=argparse.SUPPRESS)
    p.add_argument("--tiny-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.worker:
        print(json.dumps(worker(*args.worker, args.tiny_dir)))
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in DATA]
    if unknown:
        print(f"error: unknown model(s) {unknown}; choose from {', '.join(DATA)}", file=sys.stderr)
        return 2
    prefix = Path(args.out_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text(encoding="utf-8"))["rows"]
        estimate = llama_estimate(rows)
        text = render(rows, estimate)
        Path(f"{prefix}.md").write_text(text, encoding="utf-8")
        Path(f"{prefix}.json").write_text(json.dumps({"rows": rows, "llama_3_8b_estimate": estimate}, indent=1) + "\n",
                                          encoding="utf-8")
        print(text)
        return 0
    with open(f"{prefix}.log", "w", encoding="utf-8") as log:
        rows = run_all(models, log)
        estimate = llama_estimate(rows)
        text = render(rows, estimate)
        log.write(text)
    Path(f"{prefix}.md").write_text(text, encoding="utf-8")
    slim = [{k: v for k, v in r.items() if k != "plan_tensors"} for r in rows]
    Path(f"{prefix}.json").write_text(json.dumps({"rows": slim, "llama_3_8b_estimate": estimate}, indent=1) + "\n",
                                      encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
