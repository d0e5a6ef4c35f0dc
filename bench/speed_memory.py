"""Speed and memory of kvplan plans vs the stock cache: prefill time, decode tokens/s, peak RSS, KV bytes.

One model, one or more plans, a grid of batch sizes x contexts::

    python bench/speed_memory.py --plan artifacts/smollm2-135m-r0.5.safetensors \
        --plan artifacts/smollm2-135m-r0.25.safetensors --plan artifacts/smollm2-135m-r0.125.safetensors \
        --json artifacts/speed_memory.json --markdown artifacts/speed_memory.md --png artifacts/speed_memory.png

For every cell (batch B, context C) of ``--batch`` x ``--context`` three kinds of configuration are measured:

- ``stock``: the model's stock ``DynamicCache`` on a C-token prompt;
- each plan on the same C-token prompt;
- ``stock@L`` ("the limit"): the stock cache on the last L tokens of that prompt, L = the tokens the plan keeps
  (C x the plan's compressed ratio, as in ``bench/pyramidinfer_report.py``). A plan cannot decode faster than
  stock decoding over the context it holds, so plan/limit is how close the runtime gets to its physical bound.

Each measurement = one prefill (timed) + ``--decode-steps`` greedy decode steps (timed alone, tokens/s = B x steps /
seconds), the cache's physical bytes right after the prefill (``runtime.physical_bytes``) next to
``runtime.theoretical_bytes`` and ``runtime.stock_bytes``, and the process's peak resident memory.

Peak memory: every configuration of a cell runs in its own worker process (spawned, model loaded once per worker),
so peaks never mix. After loading and a small warm-up the worker resets the kernel's RSS high-water mark
(``/proc/self/clear_refs`` <- 5) and records its RSS as the baseline (model + runtime loaded); before each
measurement it resets the mark again and reads ``VmHWM`` from ``/proc/self/status`` after it. Where the reset is
not allowed the worker falls back to ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (which then includes the load;
the report says which method was used).

Repetitions are interleaved: round r measures stock, plan 1, limit 1, plan 2, limit 2, ... (order rotated by r) on
the same fresh random windows of real text, and medians are reported. Ratios from one run are what count (shared,
noisy machines). Cells with B x C >= ``--large-cell-tokens`` run ``--large-cell-repeats`` rounds (default 1: the
stock prefill of 8 x 4096 tokens takes about two minutes on 2 CPU cores, and the cell needs four of them a round).

Outputs: markdown on stdout (and ``--markdown``), raw numbers in ``--json``, and with ``--png`` a figure of fidelity
(top-1 agreement and KL per keep ratio, read from ``--fidelity-json``, the output of ``bench/compare_kvpress.py``;
passkey hits from ``--passkey-json`` when present) and of this run's speed and memory ratios per keep ratio.
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import resource
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import runtime  # noqa: E402

from bench.pyramidinfer_report import write_outputs as write_report_files  # noqa: E402
from bench.pyramidinfer_report import (  # noqa: E402  (one set of helpers for the bench scripts)
    DEFAULT_DATA,
    cache_kwarg,
    compressed_ratio,
    environment,
    load_model,
    load_token_stream,
    log,
    maybe_plan,
    md_table,
    median,
    model_dtype,
    plan_label,
    random_windows,
    seed_everything,
)
from transformers import DynamicCache  # noqa: E402

DEFAULT_FIDELITY = REPO_ROOT / "artifacts" / "kvpress_comparison.json"
DEFAULT_PASSKEY = REPO_ROOT / "artifacts" / "kvpress_passkey.json"
MIB = 2**20


# ----- process memory ------------------------------------------------------------------------------------------------
def proc_status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process in bytes (empty where /proc is missing)."""
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return values


def reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark of this process to its current RSS; False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def current_rss() -> int:
    return proc_status().get("VmRSS", 0)


def peak_rss(resettable: bool) -> int:
    return proc_status().get("VmHWM", 0) if resettable else ru_maxrss_bytes()


# ----- one measurement (inside a worker) -----------------------------------------------------------------------------
@torch.inference_mode()
def measure(model, prompt: torch.Tensor, plan: runtime.Plan | None, steps: int, resettable: bool) -> dict[str, Any]:
    """Prefill ``prompt``, read the cache's bytes, then ``steps`` greedy decode steps; times and peak RSS."""
    gc.collect()
    if resettable:
        reset_peak()
    rss_before = current_rss()
    cpu0 = cpu_seconds()
    dtype = model_dtype(model)
    batch, length = prompt.shape
    cache = DynamicCache(config=model.config)
    kw = cache_kwarg(model)
    with maybe_plan(model, plan):
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True, logits_to_keep=1, **{kw: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        physical = runtime.physical_bytes(cache)
        kept = runtime.kept_lengths(cache)
        t2 = time.perf_counter()
        for _ in range(steps):
            out = model(token, use_cache=True, **{kw: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        t3 = time.perf_counter()
    peak = peak_rss(resettable)
    cpu = cpu_seconds() - cpu0
    stock = runtime.stock_bytes(model.config, length, batch, dtype)
    theoretical = runtime.theoretical_bytes(plan, model.config, length, batch, dtype) if plan is not None else stock
    del out, cache, token
    return {
        "prefill_s": t1 - t0,
        "decode_s": t3 - t2,
        "tokens_per_s": batch * steps / (t3 - t2),
        "physical_bytes": physical,
        "theoretical_bytes": theoretical,
        "stock_bytes": stock,
        "kept_mean": statistics.fmean(kept),
        "kept_max": max(kept),
        "rss_before": rss_before,
        "peak_rss": peak,
        # CPU seconds / wall seconds of the whole measurement: ~threads on an idle machine, lower when the cores
        # are shared with other processes (the timing is then less trustworthy)
        "cpu_per_wall": cpu / (t3 - t0),
        "loadavg_1min": os.getloadavg()[0],
    }


def worker_main(conn, spec: dict[str, Any]) -> None:
    """Worker process: load the model (and plan) once, then measure every prompt the parent sends."""
    try:
        torch.set_num_threads(spec["threads"])
        seed_everything(spec["seed"])
        model = load_model(spec["model"]).model
        plan = None
        if spec["plan_path"]:
            plan = runtime.load_plan(spec["plan_path"])
            plan.validate(model)
        warm = torch.tensor(spec["warm_prompt"], dtype=torch.long)
        measure(model, warm, plan, 2, False)
        gc.collect()
        resettable = reset_peak()
        baseline = current_rss() if resettable else ru_maxrss_bytes()
        conn.send({"ready": True, "baseline_rss": baseline, "resettable": resettable, "pid": os.getpid()})
        while True:
            msg = conn.recv()
            if msg is None:
                break
            prompt = torch.tensor(msg, dtype=torch.long)
            conn.send({"ok": True, "result": measure(model, prompt, plan, spec["decode_steps"], resettable)})
    except BaseException:  # noqa: BLE001  (report anything, including KeyboardInterrupt, to the parent)
        try:
            conn.send({"ok": False, "error": traceback.format_exc()})
        except Exception:  # noqa: BLE001
            pass
    finally:
        conn.close()


class WorkerError(RuntimeError):
    pass


class Worker:
    """One spawned process per configuration of a cell."""

    def __init__(self, ctx, spec: dict[str, Any], label: str):
        self.label = label
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
        self.process.start()
        child.close()
        self.info: dict[str, Any] = {}

    def _recv(self) -> dict[str, Any]:
        try:
            msg = self.conn.recv()
        except (EOFError, ConnectionError) as exc:
            self.process.join(timeout=5)
            raise WorkerError(f"worker {self.label} died (exit code {self.process.exitcode}; killed for memory?)") from exc
        if not msg.get("ok", True):
            raise WorkerError(f"worker {self.label} failed:\n{msg['error']}")
        return msg

    def wait_ready(self) -> dict[str, Any]:
        self.info = self._recv()
        return self.info

    def run(self, prompt: torch.Tensor) -> dict[str, Any]:
        self.conn.send(prompt.tolist())
        return self._recv()["result"]

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self.conn.close()


# ----- the grid ------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    label: str
    kind: str  # "stock", "plan" or "limit"
    plan_path: str | None
    length: int


def cell_configs(plans: list[tuple[str, str, float]], context: int) -> list[Config]:
    """stock, then plan 1, limit 1, plan 2, limit 2, ... (limits deduplicated by length)."""
    configs = [Config("stock", "stock", None, context)]
    seen: set[int] = set()
    for label, path, ratio in plans:
        configs.append(Config(label, "plan", path, context))
        length = limit_length(context, ratio)
        if length not in seen:
            seen.add(length)
            configs.append(Config(f"stock@{length}", "limit", None, length))
    return configs


def limit_length(context: int, ratio: float) -> int:
    return max(1, round(context * ratio))


def summarize_config(cfg: Config, info: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    peak = max(s["peak_rss"] for s in samples)
    return {
        "kind": cfg.kind,
        "plan_path": cfg.plan_path,
        "length": cfg.length,
        "rounds": len(samples),
        "prefill_s": median([s["prefill_s"] for s in samples]),
        "decode_s": median([s["decode_s"] for s in samples]),
        "tokens_per_s": median([s["tokens_per_s"] for s in samples]),
        "physical_bytes": samples[-1]["physical_bytes"],
        "theoretical_bytes": samples[-1]["theoretical_bytes"],
        "stock_bytes": samples[-1]["stock_bytes"],
        "kept_mean": samples[-1]["kept_mean"],
        "kept_max": samples[-1]["kept_max"],
        "baseline_rss": info["baseline_rss"],
        "peak_rss": peak,
        "peak_above_baseline": peak - info["baseline_rss"],
        "peak_method": "VmHWM after reset" if info["resettable"] else "ru_maxrss (includes model load)",
        "cpu_per_wall": median([s["cpu_per_wall"] for s in samples]),
        "samples": samples,
    }


def run_cell(ctx, args, plans, tokens: torch.Tensor, batch: int, context: int, generator) -> dict[str, Any]:
    configs = cell_configs(plans, context)
    rounds = args.large_cell_repeats if batch * context >= args.large_cell_tokens else args.repeats
    warm = random_windows(tokens, batch, min(64, context), generator).tolist()
    log(f"cell batch {batch} x context {context}: {len(configs)} configurations, {rounds} round(s); starting workers")
    workers: dict[str, Worker] = {}
    try:
        for cfg in configs:
            spec = {"model": args.model, "plan_path": cfg.plan_path, "threads": args.threads, "seed": args.seed,
                    "decode_steps": args.decode_steps, "warm_prompt": warm}
            workers[cfg.label] = Worker(ctx, spec, f"{cfg.label} (batch {batch}, context {context})")
        infos = {label: w.wait_ready() for label, w in workers.items()}
        samples: dict[str, list[dict[str, Any]]] = {cfg.label: [] for cfg in configs}
        for rnd in range(rounds):
            prompts = random_windows(tokens, batch, context, generator)
            order = configs[rnd % len(configs):] + configs[: rnd % len(configs)]
            for cfg in order:
                t = time.perf_counter()
                s = workers[cfg.label].run(prompts[:, -cfg.length:])
                samples[cfg.label].append(s)
                log(f"  b{batch} c{context} round {rnd + 1}/{rounds} {cfg.label:>28}: prefill {s['prefill_s']:7.2f} s, "
                    f"decode {s['tokens_per_s']:7.1f} tok/s, KV {s['physical_bytes'] / MIB:8.1f} MiB, "
                    f"peak RSS {s['peak_rss'] / MIB:7.0f} MiB, cpu/wall {s['cpu_per_wall']:.2f}, "
                    f"load {s['loadavg_1min']:.1f} ({time.perf_counter() - t:.0f} s)")
    finally:
        for w in workers.values():
            w.close()
    rows = {cfg.label: summarize_config(cfg, infos[cfg.label], samples[cfg.label]) for cfg in configs}
    stock = rows["stock"]
    ratios = {}
    for label, _, ratio in plans:
        p = rows[label]
        length = limit_length(context, ratio)
        lim = rows[f"stock@{length}"]
        ratios[label] = {
            "keep_ratio": ratio,
            "limit_length": length,
            "prefill_vs_stock": p["prefill_s"] / stock["prefill_s"],
            "tokens_per_s_vs_stock": p["tokens_per_s"] / stock["tokens_per_s"],
            "tokens_per_s_vs_limit": p["tokens_per_s"] / lim["tokens_per_s"],
            "peak_rss_vs_stock": p["peak_rss"] / stock["peak_rss"],
            "peak_above_baseline_vs_stock": p["peak_above_baseline"] / stock["peak_above_baseline"]
            if stock["peak_above_baseline"] > 0 else float("nan"),
            "physical_vs_theoretical": p["physical_bytes"] / p["theoretical_bytes"],
            "physical_vs_stock": p["physical_bytes"] / stock["stock_bytes"],
            "theoretical_vs_stock": p["theoretical_bytes"] / stock["stock_bytes"],
        }
    return {"batch": batch, "context": context, "rounds": rounds, "configs": rows, "ratios": ratios}


# ----- report --------------------------------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / MIB:,.1f}"


def render_markdown(report: dict[str, Any], args) -> str:
    env = report["environment"]
    cells = report["cells"]
    rounds = sorted({c["rounds"] for c in cells})
    parts = [
        "# Speed and memory: kvplan plans vs the stock cache",
        "",
        f"Model `{report['model']}` ({env['dtype']}, {env['device']}, {env['attn_implementation']}); torch "
        f"{env['torch']}, transformers {env['transformers']}; {args.threads} threads on {env['cpu_count']} CPUs; "
        f"seed {args.seed}. Command: `{report['command']}`",
        "",
        f"Per cell: random windows of real text (`{args.data}`), one prefill + {args.decode_steps} greedy decode "
        f"steps per measurement, medians of {'/'.join(str(r) for r in rounds)} interleaved round(s) "
        f"({args.large_cell_repeats} where batch x context >= {args.large_cell_tokens}). Every configuration runs "
        "in its own worker process. `limit` = stock cache on the plan's compressed length (context x keep). "
        f"Total wall time {report['wall_seconds'] / 60:.1f} min.",
        "",
        "## Speed (plan vs stock at the full context, and vs the limit)",
        "",
    ]
    rows = []
    for c in cells:
        st = c["configs"]["stock"]
        for label, r in c["ratios"].items():
            p = c["configs"][label]
            lim = c["configs"][f"stock@{r['limit_length']}"]
            rows.append([c["batch"], c["context"], f"{r['keep_ratio']:g}", r["limit_length"],
                         f"{st['prefill_s']:.2f} / {p['prefill_s']:.2f}", f"{r['prefill_vs_stock']:.2f}",
                         f"{st['tokens_per_s']:.1f} / {p['tokens_per_s']:.1f} / {lim['tokens_per_s']:.1f}",
                         f"**{r['tokens_per_s_vs_stock']:.2f}**", f"{r['tokens_per_s_vs_limit']:.2f}"])
    parts.append(md_table(["batch", "context", "keep", "limit len", "prefill s stock / plan", "prefill plan/stock",
                           "decode tok/s stock / plan / limit", "decode plan/stock", "decode plan/limit"], rows))
    parts += ["", "## Memory (peak process RSS and KV bytes right after the prefill)", ""]
    rows = []
    for c in cells:
        st = c["configs"]["stock"]
        for label, r in c["ratios"].items():
            p = c["configs"][label]
            rows.append([c["batch"], c["context"], f"{r['keep_ratio']:g}",
                         f"{mib(st['peak_rss'])} / {mib(p['peak_rss'])}", f"{r['peak_rss_vs_stock']:.2f}",
                         f"{mib(st['peak_above_baseline'])} / {mib(p['peak_above_baseline'])}",
                         f"{r['peak_above_baseline_vs_stock']:.2f}",
                         f"{mib(p['physical_bytes'])} / {mib(p['theoretical_bytes'])} / {mib(st['stock_bytes'])}",
                         f"{r['physical_vs_theoretical']:.3f}", f"**{r['physical_vs_stock']:.3f}**"])
    parts.append(md_table(["batch", "context", "keep", "peak RSS MiB stock / plan", "peak plan/stock",
                           "peak above baseline MiB stock / plan", "above-baseline plan/stock",
                           "KV MiB physical / theoretical / stock", "phys/theor", "phys/stock"], rows))
    methods = sorted({cfg["peak_method"] for c in cells for cfg in c["configs"].values()})
    baselines = [cfg["baseline_rss"] for c in cells for cfg in c["configs"].values()]
    parts += ["", f"Peak RSS: {', '.join(methods)}; baseline = the worker's RSS with the model and runtime loaded "
              f"after a warm-up ({mib(min(baselines))}-{mib(max(baselines))} MiB). Physical KV bytes include the "
              "plan's per-token bookkeeping (position and score) and decode slack; theoretical does not.",
              "", "## Every configuration (medians)", ""]
    rows = []
    for c in cells:
        for label, cfg in c["configs"].items():
            rows.append([c["batch"], c["context"], label, cfg["length"], cfg["rounds"], f"{cfg['prefill_s']:.2f}",
                         f"{cfg['tokens_per_s']:.1f}", f"{cfg['decode_s']:.3f}", mib(cfg["physical_bytes"]),
                         f"{cfg['kept_mean']:.1f}", cfg["kept_max"], mib(cfg["baseline_rss"]), mib(cfg["peak_rss"]),
                         f"{cfg['cpu_per_wall']:.2f}"])
    parts.append(md_table(["batch", "context", "config", "prompt tokens", "rounds", "prefill s", "decode tok/s",
                           "decode s", "KV MiB after prefill", "mean kept", "max kept", "baseline RSS MiB",
                           "peak RSS MiB", "cpu/wall"], rows))
    loads = [s["loadavg_1min"] for c in cells for cfg in c["configs"].values() for s in cfg["samples"]]
    parts += ["", f"`cpu/wall` = CPU seconds of the worker per wall second of a measurement (about {args.threads} on "
              f"otherwise idle cores; lower means the cores were shared). 1-minute load average during the "
              f"measurements: {min(loads):.1f}-{max(loads):.1f} on {report['environment']['cpu_count']} CPUs."]
    return "\n".join(parts) + "\n"


# ----- figure --------------------------------------------------------------------------------------------------------
def load_fidelity(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.is_file():
        return []
    return json.loads(path.read_text()).get("summary", [])


def method_family(name: str) -> str:
    """``kvpress-snapkv@0.5`` -> ``kvpress-snapkv``; ``kvplan-pyramidinfer@0.25`` -> ``kvplan-pyramidinfer``."""
    return name.split("@", 1)[0]


def plot(report: dict[str, Any], fidelity: list[dict[str, Any]], passkey: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    colors = plt.get_cmap("tab10").colors

    def fidelity_panel(ax, rows, key, title, ylabel, logy=False, scale=None):
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in rows:
            if r.get("keep_ratio") is None or r.get(key) is None:
                continue
            value = r[key] * (scale(r) if scale else 1)
            groups.setdefault(method_family(r["method"]), []).append((r["keep_ratio"], value))
        if not groups:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        for i, (name, pts) in enumerate(sorted(groups.items(), key=lambda kv: (not kv[0].startswith("kvplan"), kv[0]))):
            pts.sort()
            mine = name.startswith("kvplan")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=3 if mine else 1.2,
                    color="black" if mine else colors[i % len(colors)], zorder=5 if mine else 2,
                    label=name.replace("kvpress-", "kvpress ").replace("kvplan-pyramidinfer", "kvplan PyramidInfer"))
        ax.set_xscale("log", base=2)
        ax.set_xticks([0.125, 0.25, 0.5])
        ax.set_xticklabels(["0.125\n(8x)", "0.25\n(4x)", "0.5\n(2x)"])
        ax.invert_xaxis()
        if logy:
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("keep ratio (compression)")
        ax.grid(alpha=0.3)

    fidelity_panel(axes[0, 0], fidelity, "lm_top1", "Top-1 agreement with the full cache (higher is better)",
                   "top-1 agreement")
    axes[0, 0].legend(fontsize=8, loc="lower left")
    fidelity_panel(axes[0, 1], fidelity, "lm_kl", "KL(full || method), nats (lower is better)", "mean KL", logy=True)
    full = next((r for r in passkey if r.get("method") == "full"), None)
    cases = None
    if full and full.get("passkey_grid"):
        cases = report.get("passkey_cases")
    ylabel = "passkey hits" + (f" out of {cases}" if cases else " (accuracy)")
    fidelity_panel(axes[0, 2], passkey, "passkey_accuracy",
                   "Passkey retrieval" + (f" (full cache: {full['passkey_accuracy'] * cases:.0f}/{cases})"
                                          if full and cases else ""), ylabel,
                   scale=(lambda r: cases) if cases else None)

    cell_colors = {ctx: colors[i] for i, ctx in enumerate(sorted({c["context"] for c in report["cells"]}))}
    batch_styles = {b: ls for b, ls in zip(sorted({c["batch"] for c in report["cells"]}), ["-", "--", ":", "-."] * 4)}
    markers = {b: m for b, m in zip(sorted({c["batch"] for c in report["cells"]}), ["o", "s", "^", "D"] * 4)}

    def speed_panel(ax, key, title, ylabel):
        for c in report["cells"]:
            pts = sorted((r["keep_ratio"], r[key]) for r in c["ratios"].values())
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls=batch_styles[c["batch"]], marker=markers[c["batch"]],
                    color=cell_colors[c["context"]], label=f"batch {c['batch']}, context {c['context']}")
        ax.axhline(1.0, color="gray", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks([0.125, 0.25, 0.5])
        ax.set_xticklabels(["0.125\n(8x)", "0.25\n(4x)", "0.5\n(2x)"])
        ax.invert_xaxis()
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("keep ratio (compression)")
        ax.grid(alpha=0.3)

    speed_panel(axes[1, 0], "tokens_per_s_vs_stock", "Decode tok/s, plan / stock at the full context (>1: faster)",
                "speed-up")
    axes[1, 0].legend(fontsize=8)
    speed_panel(axes[1, 1], "tokens_per_s_vs_limit",
                "Decode tok/s, plan / stock at the compressed length (1 = the limit)", "fraction of the limit")
    speed_panel(axes[1, 2], "peak_above_baseline_vs_stock",
                "Peak RSS above the loaded model, plan / stock (<1: saves)", "ratio")
    keep = sorted({r["keep_ratio"] for c in report["cells"] for r in c["ratios"].values()})
    axes[1, 2].plot(keep, keep, color="black", lw=1, ls=":", label="y = keep (KV bytes alone)")
    axes[1, 2].legend(fontsize=8)
    env = report["environment"]
    fig.suptitle(f"kvplan on {report['model']}: fidelity (kvplan vs kvpress 0.5.5, same harness) and speed/memory "
                 f"(CPU, {env['threads']} threads, {env['dtype']})", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def passkey_cases(path: Path | None) -> int | None:
    if path is None or not path.is_file():
        return None
    args = json.loads(path.read_text()).get("args", {})
    try:
        return len(args["depths"]) * int(args["trials"])
    except (KeyError, TypeError):
        return None


# ----- CLI -----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Prefill time, decode tokens/s, peak process memory and KV bytes of kvplan plans vs the stock "
                    "cache (and vs stock decoding at the compressed length), for a grid of batch sizes x contexts. "
                    "Each configuration runs in its own worker process; markdown on stdout, progress on stderr.",
    )
    p.add_argument("--model", default="smollm2-135m", help="recipe alias or local HF model directory (default: %(default)s)")
    p.add_argument("--plan", action="append", default=[], help="plan file (repeatable; required unless --from-json)")
    p.add_argument("--from-json", type=Path, default=None,
                   help="measure nothing: re-render --markdown/--png from a JSON this script wrote (e.g. after "
                        "--passkey-json appeared)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: %(default)s)")
    p.add_argument("--context", type=int, nargs="+", default=[1024, 2048, 4096], help="contexts (default: %(default)s)")
    p.add_argument("--decode-steps", type=int, default=16, help="timed greedy decode steps (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per cell (default: %(default)s)")
    p.add_argument("--large-cell-tokens", type=int, default=32768,
                   help="cells with batch x context >= this run --large-cell-repeats rounds (default: %(default)s)")
    p.add_argument("--large-cell-repeats", type=int, default=1, help="rounds for large cells (default: %(default)s)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of .txt files (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the raw results here")
    p.add_argument("--markdown", type=Path, default=None, help="also write the markdown report here")
    p.add_argument("--png", type=Path, default=None, help="write the fidelity/speed/memory figure here (matplotlib)")
    p.add_argument("--fidelity-json", type=Path, default=DEFAULT_FIDELITY,
                   help="bench/compare_kvpress.py JSON with lm top-1/KL per method and keep ratio (default: %(default)s)")
    p.add_argument("--passkey-json", type=Path, default=DEFAULT_PASSKEY,
                   help="bench/compare_kvpress.py JSON with passkey results (default: %(default)s; skipped if missing)")
    args = p.parse_args(argv)
    for name in ("decode_steps", "repeats", "large_cell_repeats", "threads", "large_cell_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for b in args.batch:
        if b < 1:
            p.error(f"--batch values must be >= 1 (got {b})")
    for c in args.context:
        if c < 16:
            p.error(f"--context values must be >= 16 (got {c})")
    if args.from_json is not None:
        if not args.from_json.is_file():
            p.error(f"--from-json {args.from_json}: no such file")
    elif not args.plan:
        p.error("--plan is required (or --from-json to re-render a finished run)")
    for path in args.plan:
        if not Path(path).is_file():
            p.error(f"--plan {path}: no such file")
    if not args.data.is_dir():
        p.error(f"--data {args.data}: not a folder")
    if args.png is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--png needs matplotlib: pip install -e '.[plot]' (or pip install matplotlib)")
    return args


def write_outputs(report: dict[str, Any], args, final: bool) -> str:
    """Write --json and --markdown (also after every cell, marked partial, so a cut run keeps what it measured)."""
    report["complete"] = final
    report["passkey_cases"] = passkey_cases(args.passkey_json)
    text = render_markdown(report, args)
    if not final:
        text = "**PARTIAL: the run was still going when this was written.**\n\n" + text
    write_report_files(text, report, args.markdown, args.json)
    return text


def rerender(args) -> int:
    """--from-json: rebuild the markdown (stdout, --markdown) and the figure (--png) of a finished run."""
    report = json.loads(args.from_json.read_text())
    saved = argparse.Namespace(**{**report["args"], "data": Path(report["args"]["data"])})
    saved.passkey_json = args.passkey_json
    report["passkey_cases"] = passkey_cases(args.passkey_json)
    text = render_markdown(report, saved)
    if not report.get("complete", True):
        done = {(c["batch"], c["context"]) for c in report["cells"]}
        missing = [f"batch {b} x context {c}" for b in saved.batch for c in saved.context if (b, c) not in done]
        text = ("**PARTIAL: the run stopped before the end of its grid; not measured: "
                + (", ".join(missing) or "none") + ".**\n\n" + text)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.png:
        plot(report, load_fidelity(args.fidelity_json), load_fidelity(args.passkey_json), args.png)
        log(f"figure written to {args.png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        return rerender(args)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    log(f"loading {args.model} once in the parent (plans are validated against it; workers load their own copy)")
    loaded = load_model(args.model)
    plans: list[tuple[str, str, float]] = []
    plans_json = {}
    for path in args.plan:
        try:
            plan = runtime.load_plan(path)
            plan.validate(loaded.model)
        except runtime.PlanError as exc:
            raise SystemExit(f"speed_memory: plan {path}: {exc}") from exc
        label = plan_label(path, plan)
        ratio = compressed_ratio(plan, loaded.model.config, max(args.context), model_dtype(loaded.model))
        plans.append((label, str(path), ratio))
        plans_json[label] = {"path": str(path), "target_ratio": plan.target_ratio, "keep_ratio": ratio}
    if len({label for label, _, _ in plans}) != len(plans):
        raise SystemExit("speed_memory: two --plan files have the same label; pass each plan once")
    env = environment(loaded.model)
    log(f"tokenizing {args.data}")
    tokens = load_token_stream(args.data, loaded.tokenizer)
    if len(tokens) < max(args.context):
        raise SystemExit(f"speed_memory: {args.data} has {len(tokens)} tokens, fewer than --context {max(args.context)}")
    del loaded
    gc.collect()
    ctx = mp.get_context("spawn")
    generator = torch.Generator().manual_seed(args.seed + 1)
    report: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "model": args.model,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": env,
        "plans": plans_json,
        "data_tokens": len(tokens),
        "cells": [],
    }
    try:
        for batch in args.batch:
            for context in args.context:
                t = time.perf_counter()
                cell = run_cell(ctx, args, plans, tokens, batch, context, generator)
                cell["wall_seconds"] = time.perf_counter() - t
                report["cells"].append(cell)
                report["wall_seconds"] = time.perf_counter() - start
                write_outputs(report, args, final=False)
                log(f"cell batch {batch} x context {context} done in {cell['wall_seconds']:.0f} s; "
                    + "; ".join(f"{lab}: decode x{r['tokens_per_s_vs_stock']:.2f} vs stock, "
                                f"x{r['tokens_per_s_vs_limit']:.2f} vs limit" for lab, r in cell["ratios"].items()))
    except WorkerError as exc:
        raise SystemExit(f"speed_memory: {exc}") from exc
    report["wall_seconds"] = time.perf_counter() - start
    text = write_outputs(report, args, final=True)
    print(text)
    if args.png:
        plot(report, load_fidelity(args.fidelity_json), load_fidelity(args.passkey_json), args.png)
        log(f"figure written to {args.png}")
    log(f"done in {report['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
