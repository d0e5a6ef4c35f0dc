"""Speed and memory of kvplan plans vs the stock cache: prefill time, decode tokens/s, peak RSS, KV bytes, and the
largest prompt that fits under a memory cap.

One model, one or more plans, a list of cells (batch x context)::

    python bench/speed_memory.py --plan artifacts/smollm2-135m-r0.5.safetensors \
        --plan artifacts/smollm2-135m-r0.25.safetensors --plan all8x=artifacts/smollm2-135m-all-8x \
        --cells 1x1024 1x4096 1x8192 1x16384 8x1024 8x2048 8x4096 \
        --json artifacts/speed_memory.json --markdown artifacts/speed_memory.md --png artifacts/speed_memory.png

Plans: ``--plan PATH`` or ``--plan LABEL=PATH``; PATH is a plan file or a plan folder (holding ``plan.safetensors``,
as ``artifacts/smollm2-135m-all-8x/``). Without a label the label is the file (or folder) name and the plan's
target ratio. Cells: ``--cells 1x1024 8x4096 ...`` (batch x context), or the cartesian product ``--batch`` x
``--context`` (default 1, 8 x 1024, 2048, 4096). A cell whose context is beyond the model's
``max_position_embeddings`` still runs (RoPE extrapolates; speed and memory only) and is flagged in the JSON and
the markdown: quality is not claimed there.

For every cell (batch B, context C) three kinds of configuration are measured:

- ``stock``: the model's stock ``DynamicCache`` on a C-token prompt;
- each plan on the same C-token prompt (applied with ``runtime.apply_plan(model, plan,
  prefill_chunk_size=--prefill-chunk-size)``: by default the runtime's, which feeds prompts longer than
  ``runtime.chunking.DEFAULT_PREFILL_CHUNK_SIZE`` tokens in chunks of that size; the stock cache is always prefilled
  in one piece);
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

Allocator (``--malloc``): peaks depend heavily on glibc malloc. With ``trim`` (default) the workers start with
``MALLOC_MMAP_THRESHOLD_=131072`` and ``MALLOC_TRIM_THRESHOLD_=131072``: allocations above 128 KiB get their own
mappings and freed memory goes back to the OS, so a peak is what a measurement needed, not what earlier ones left
in the heap. With ``default`` both variables are removed from the workers' environment (glibc's defaults: a dynamic
mmap threshold, freed memory mostly kept; peaks read higher). glibc reads them at process start, and a spawned
worker is a fresh interpreter that inherits the parent's ``os.environ``, so the parent sets them before starting the
workers; the parent then reads each worker's ``/proc/<pid>/environ`` (the environment that process started with)
and records what it found.

Repetitions are interleaved: round r measures stock, plan 1, limit 1, plan 2, limit 2, ... (order rotated by r) on
the same fresh random windows of real text, and medians are reported. Ratios from one run are what count (shared,
noisy machines). Cells with B x C >= ``--large-cell-tokens`` run ``--large-cell-repeats`` rounds (default 1: the
stock prefill of 8 x 4096 tokens takes about two minutes on 2 CPU cores, and the cell needs four of them a round).

Memory-cap search (``--fit-cap MiB``): for stock and each plan, the largest prompt (a multiple of ``--fit-step``, at
most ``--fit-max``, batch ``--fit-batch``) whose prefill + ``--fit-decode-steps`` decode steps run under a hard cap
of ``baseline + cap``. Each configuration gets one worker; after it loaded the model and warmed up, the worker sets
``resource.setrlimit(RLIMIT_AS, VmSize + cap)`` and reports that VmSize (the baseline) and the limit. RLIMIT_AS caps
the process's *virtual* address space, and strictly: a ``malloc``/``mmap`` beyond it fails, which torch raises as a
``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory"; ``MemoryError`` from Python). The worker catches it,
frees what the attempt held and reports "does not fit"; it keeps its cap and serves the next probe (a worker that
dies anyway, e.g. an allocation failing inside a C++ thread, is restarted and the probe counts as "does not fit").
Checked on this machine: the failure is recoverable (raises, no crash; shorter prompts fit again afterwards).
Two glibc details make the cap a cap on the heap:

- the workers of the search start with ``MALLOC_ARENA_MAX=1`` (on top of ``--malloc``). Otherwise glibc keeps
  per-thread arenas, 64 MiB address-space reservations made while the model loads (about 190 MiB of VmSize in a
  SmolLM2 worker), and when an ``mmap`` fails under the limit, malloc falls back to growing such an arena inside
  its reservation, which RLIMIT_AS does not see: a tiny-model worker capped at 8 MiB grew its RSS by 23 MiB that
  way; with one arena the same worker stops at 8 MiB.
- the first failed allocation can make glibc create a fresh arena (a 64 MiB reservation that stays), which would
  shrink the room of every later probe. The worker provokes one failure before it takes its baseline (an
  allocation larger than the cap under a provisional limit), so every probe sees the same room.

Because the cap is on address space, memory mapped but not touched counts too; it is stricter than RSS and the same
for every configuration, and the report also gives the peak RSS above the baseline at the largest prompt that fit.
Use ``--malloc trim`` (the default) for the search: with ``default`` freed memory stays in the heap, so a probe's
room depends on the probes before it (``vm_after_above_baseline`` of each probe in the JSON shows what stayed).
Alternatives not taken: a memory cgroup caps RSS, but answers an excess with the OOM killer (a worker restart per
failed probe) and means creating cgroups under a hierarchy that other software manages; polling RSS cannot stop an
allocation, only see it afterwards. The search assumes "fits" is monotonic in the length: lengths fit-step,
2 x fit-step, 4 x fit-step, ... until one does not fit (or fit-max is reached), then bisection between the last
that fit and the first that did not; every probe of a configuration in the same worker, with the same prompt windows
for every configuration at a given length. A plan is applied with ``--prefill-chunk-size`` here too.
With ``--fit-cap`` and none of ``--cells``/``--batch``/``--context``, only the search runs.

Outputs: markdown on stdout (and ``--markdown``), raw numbers in ``--json``, and with ``--png`` a figure of fidelity
(top-1 agreement and KL per keep ratio, read from ``--fidelity-json``, the output of ``bench/compare_kvpress.py``;
passkey hits from ``--passkey-json`` when present) and of this run's speed and memory ratios per keep ratio. When
the plans include an 8x plan (keep ratio 1/8) the markdown starts with a compact "targets" block computed from the
cells that ran. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import gc
import json
import multiprocessing as mp
import os
import re
import resource
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

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
    md_table,
    median,
    model_dtype,
    plan_label,
    random_windows,
    seed_everything,
)
from runtime.chunking import AUTO, DEFAULT_PREFILL_CHUNK_SIZE, resolve_chunk_size  # noqa: E402
from runtime.planfile import DEFAULT_FILENAME as PLAN_FILENAME  # noqa: E402
from transformers import DynamicCache  # noqa: E402

DEFAULT_FIDELITY = REPO_ROOT / "artifacts" / "kvpress_comparison.json"
DEFAULT_PASSKEY = REPO_ROOT / "artifacts" / "kvpress_passkey.json"
DEFAULT_BATCH = [1, 8]
DEFAULT_CONTEXT = [1024, 2048, 4096]
MIB = 2**20

#: environment the workers start with under ``--malloc trim``
MALLOC_TRIM_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
#: glibc ``mallopt`` parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: ``--decode-malloc keep``: the thresholds the decode rate is timed under, glibc's own ceilings for its dynamic ones
#: on 64-bit (allocations below 32 MiB from the heap, up to 64 MiB of freed memory kept): what a process with default
#: malloc settings settles into once it has freed a few large blocks, i.e. how a user's process runs
KEEP_MALLOC = {M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}
#: decode steps run (untimed) after switching to KEEP_MALLOC, before the timed ones: the heap grows once
KEEP_WARM_STEPS = 2
#: added for the workers of the memory-cap search: one malloc arena, so that RLIMIT_AS caps the heap (see the module
#: docstring)
FIT_WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}
#: cells the "targets" block of the markdown looks for (when they ran): peak memory at long contexts, and speed
#: at a short one (where a plan has the least to gain)
TARGET_PEAK_CELLS = ((1, 8192), (8, 4096))
TARGET_SHORT_CELL = (1, 1024)
#: a worker that dies during the memory-cap search is restarted at most this many times per configuration
MAX_FIT_RESTARTS = 3


# ----- process memory ------------------------------------------------------------------------------------------------
def proc_status(pid: int | str = "self") -> dict[str, int]:
    """``VmSize``, ``VmPeak``, ``VmRSS`` and ``VmHWM`` of a process in bytes (empty where /proc is missing)."""
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmSize", "VmPeak", "VmRSS", "VmHWM"):
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


def current_vmsize() -> int:
    return proc_status().get("VmSize", 0)


def peak_rss(resettable: bool) -> int:
    return proc_status().get("VmHWM", 0) if resettable else ru_maxrss_bytes()


# ----- allocator -----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def environ_set(values: dict[str, str | None]) -> Iterator[None]:
    """Set (a string) or remove (None) variables of ``os.environ`` for the block, then restore them. Processes spawned
    inside the block start with them; this process's glibc read its own environment when it started."""
    previous = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def worker_malloc_env(choice: str) -> Iterator[dict[str, str]]:
    """Set (``trim``) or remove (``default``) glibc's malloc variables in ``os.environ`` for the block, so that the
    workers spawned inside it start with them. Yields the ``MALLOC_*`` variables the workers should see."""
    if choice not in ("trim", "default"):
        raise ValueError(f"malloc choice must be 'trim' or 'default', not {choice!r}")
    values = dict(MALLOC_TRIM_ENV) if choice == "trim" else {key: None for key in MALLOC_TRIM_ENV}
    with environ_set(values):
        yield {k: v for k, v in values.items() if v is not None}


def process_malloc_env(pid: int) -> dict[str, str] | None:
    """The ``MALLOC_*`` variables process ``pid`` started with (``/proc/<pid>/environ``); None if unreadable."""
    try:
        data = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    found = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key.startswith(b"MALLOC_"):
            found[key.decode(errors="replace")] = value.decode(errors="replace")
    return found


# ----- memory cap (inside a worker) ----------------------------------------------------------------------------------
def set_address_space_limit(total: int) -> None:
    """Soft ``RLIMIT_AS`` = ``total`` bytes (the hard limit stays, so the soft one can be moved again)."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and total > hard:
        raise RuntimeError(f"RLIMIT_AS: cannot set {total} bytes above the hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_AS, (total, hard))


def cap_address_space(cap: int) -> dict[str, Any]:
    """Cap this process's address space at its current ``VmSize`` + ``cap`` bytes (``RLIMIT_AS``).

    Before taking the baseline it provokes one failed allocation (larger than the cap, under a provisional limit):
    glibc answers the first failure by creating a malloc arena (a 64 MiB address-space reservation) that stays, and
    it must exist before the baseline, or the first probe that fails would shrink the room of all later ones.
    ``enforced`` is False when that allocation did not fail (the limit does not hold here).
    """
    gc.collect()
    before = current_vmsize()
    set_address_space_limit(before + cap)
    enforced = False
    try:
        probe = torch.empty(cap + 64 * MIB, dtype=torch.uint8)
        del probe
    except (RuntimeError, MemoryError):
        enforced = True
    gc.collect()
    baseline = current_vmsize()
    set_address_space_limit(baseline + cap)
    return {"vm_before_priming": before, "vm_baseline": baseline, "cap": cap, "rlimit_as": baseline + cap,
            "cap_enforced": enforced}


_OOM_TEXT = ("can't allocate memory", "cannot allocate memory", "out of memory", "not enough memory", "bad_alloc",
             "bad alloc")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (what RLIMIT_AS produces), not a bug."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ENOMEM:
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return any(t in text for t in _OOM_TEXT)
    return False


# ----- glibc malloc settings at run time ---------------------------------------------------------------------------
def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def set_malloc(params: dict[int, int]) -> bool:
    """``mallopt`` each ``{parameter: value}``; False where glibc's ``mallopt`` is not available or refuses one."""
    libc = _libc()
    if libc is None:
        return False
    return all(libc.mallopt(ctypes.c_int(k), ctypes.c_int(v)) == 1 for k, v in params.items())


def release_free_memory() -> None:
    """``malloc_trim(0)``: hand freed heap memory back to the OS (glibc only; nothing elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(ctypes.c_size_t(0))


def trim_params_from_env() -> dict[int, int] | None:
    """The thresholds this process started with under ``--malloc trim`` (None: not started so)."""
    if any(os.environ.get(k) != v for k, v in MALLOC_TRIM_ENV.items()):
        return None
    return {M_MMAP_THRESHOLD: int(MALLOC_TRIM_ENV["MALLOC_MMAP_THRESHOLD_"]),
            M_TRIM_THRESHOLD: int(MALLOC_TRIM_ENV["MALLOC_TRIM_THRESHOLD_"])}


def timed_steps(model, token: torch.Tensor, cache, kw: str, steps: int) -> tuple[torch.Tensor, float]:
    """``steps`` greedy decode steps; the next token and the seconds they took."""
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(token, use_cache=True, **{kw: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return token, time.perf_counter() - t0


# ----- one measurement (inside a worker) -----------------------------------------------------------------------------
@contextlib.contextmanager
def plan_applied(model: torch.nn.Module, plan: runtime.Plan | None,
                 prefill_chunk_size: int | str | None = AUTO) -> Iterator[None]:
    """Apply ``plan`` (with ``prefill_chunk_size``) for the block; nothing when ``plan`` is None (stock cache)."""
    if plan is None:
        yield
        return
    with runtime.apply_plan(model, plan, prefill_chunk_size=prefill_chunk_size):
        yield


@torch.inference_mode()
def measure(model, prompt: torch.Tensor, plan: runtime.Plan | None, steps: int, resettable: bool,
            prefill_chunk_size: int | str | None = AUTO, rate_malloc: dict[int, int] | None = None,
            restore_malloc: dict[int, int] | None = None) -> dict[str, Any]:
    """Prefill ``prompt``, read the cache's bytes, then ``steps`` greedy decode steps; times and peak RSS.

    ``rate_malloc`` (``mallopt`` parameters): after that (the peak is read), switch malloc to them, run
    :data:`KEEP_WARM_STEPS` more steps, time ``steps`` more for the decode rate (``tokens_per_s``; the first steps'
    rate is ``tokens_per_s_peak_phase``), then set ``restore_malloc`` and hand freed memory back to the OS, so that
    the next measurement's peak starts clean. None: the rate is the first steps'."""
    gc.collect()
    if resettable:
        reset_peak()
    rss_before = current_rss()
    cpu0 = cpu_seconds()
    dtype = model_dtype(model)
    batch, length = prompt.shape
    cache = DynamicCache(config=model.config)
    kw = cache_kwarg(model)
    with plan_applied(model, plan, prefill_chunk_size):
        t0 = time.perf_counter()
        out = model(prompt, use_cache=True, logits_to_keep=1, **{kw: cache})
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        physical = runtime.physical_bytes(cache)
        kept = runtime.kept_lengths(cache)
        t2 = time.perf_counter()
        token, first_s = timed_steps(model, token, cache, kw, steps)
        t3 = t2 + first_s
        peak = peak_rss(resettable)
        cpu = cpu_seconds() - cpu0
        rate_s = first_s
        switched = False
        if rate_malloc is not None:
            switched = set_malloc(rate_malloc)
            try:
                token, _ = timed_steps(model, token, cache, kw, KEEP_WARM_STEPS)
                token, rate_s = timed_steps(model, token, cache, kw, steps)
            finally:
                if restore_malloc is not None:  # a worker started under default malloc keeps KEEP_MALLOC (its own
                    set_malloc(restore_malloc)  # dynamic thresholds cannot be set back; they rise to the same ceiling)
    stock = runtime.stock_bytes(model.config, length, batch, dtype)
    theoretical = runtime.theoretical_bytes(plan, model.config, length, batch, dtype) if plan is not None else stock
    del out, cache, token
    if rate_malloc is not None:
        gc.collect()
        release_free_memory()
    return {
        "prefill_s": t1 - t0,
        "decode_s": rate_s,
        "tokens_per_s": batch * steps / rate_s,
        "tokens_per_s_peak_phase": batch * steps / first_s,
        "rate_malloc": "keep" if switched else "as started",
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


def probe(model, prompt: torch.Tensor, plan: runtime.Plan | None, steps: int, resettable: bool,
          prefill_chunk_size: int | str | None = AUTO) -> dict[str, Any]:
    """One memory-cap probe: :func:`measure`, with an allocation failure reported as "does not fit" (anything else
    is raised). What the failed attempt held is freed before returning."""
    try:
        result = measure(model, prompt, plan, steps, resettable, prefill_chunk_size)
    except Exception as exc:  # noqa: BLE001  (only allocation failures are caught; is_out_of_memory decides)
        if not is_out_of_memory(exc):
            raise
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    else:
        return {"fits": True, "result": result, "error": None, "vm_after": current_vmsize()}
    gc.collect()  # the exception (and its frames holding the tensors) is gone: free what they held
    return {"fits": False, "result": None, "error": error, "vm_after": current_vmsize()}


def worker_main(conn, spec: dict[str, Any]) -> None:
    """Worker process: load the model (and plan) once, then measure (or probe) every prompt the parent sends."""
    try:
        torch.set_num_threads(spec["threads"])
        seed_everything(spec["seed"])
        model = load_model(spec["model"]).model
        plan = None
        if spec["plan_path"]:
            plan = runtime.load_plan(spec["plan_path"])
            plan.validate(model)
        chunk = spec.get("prefill_chunk_size", AUTO)
        warm = torch.tensor(spec["warm_prompt"], dtype=torch.long)
        measure(model, warm, plan, 2, False, chunk)
        gc.collect()
        ready: dict[str, Any] = {"ready": True, "pid": os.getpid()}
        rate_malloc = restore = None
        if spec.get("decode_malloc") == "keep":
            rate_malloc, restore = KEEP_MALLOC, trim_params_from_env()
        if spec.get("fit_cap"):
            ready.update(cap_address_space(spec["fit_cap"]))
        resettable = reset_peak()
        ready["baseline_rss"] = current_rss() if resettable else ru_maxrss_bytes()
        ready["resettable"] = resettable
        conn.send(ready)
        while True:
            msg = conn.recv()
            if msg is None:
                break
            prompt = torch.tensor(msg["prompt"], dtype=torch.long)
            if msg["op"] == "probe":
                conn.send({"ok": True, **probe(model, prompt, plan, msg["steps"], resettable, chunk)})
            else:
                conn.send({"ok": True, "result": measure(model, prompt, plan, spec["decode_steps"], resettable,
                                                         chunk, rate_malloc, restore)})
            del prompt
    except BaseException:  # noqa: BLE001  (report anything, including KeyboardInterrupt, to the parent)
        try:
            conn.send({"ok": False, "error": traceback.format_exc()})
        except Exception:  # noqa: BLE001
            pass
    finally:
        conn.close()


class WorkerError(RuntimeError):
    pass


class WorkerDied(WorkerError):
    """The worker process ended without an answer (killed, crashed)."""


class Worker:
    """One spawned process per configuration of a cell (or of the memory-cap search)."""

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
            raise WorkerDied(f"worker {self.label} died (exit code {self.process.exitcode}; killed for "
                             "memory?)") from exc
        if not msg.get("ok", True):
            raise WorkerError(f"worker {self.label} failed:\n{msg['error']}")
        return msg

    def wait_ready(self) -> dict[str, Any]:
        self.info = self._recv()
        self.info["malloc_env"] = process_malloc_env(self.info["pid"])
        return self.info

    def run(self, prompt: torch.Tensor) -> dict[str, Any]:
        self.conn.send({"op": "measure", "prompt": prompt.tolist()})
        return self._recv()["result"]

    def probe(self, prompt: torch.Tensor, steps: int) -> dict[str, Any]:
        self.conn.send({"op": "probe", "prompt": prompt.tolist(), "steps": steps})
        return self._recv()

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


# ----- cells and plans -----------------------------------------------------------------------------------------------
_CELL = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_cell(text: str) -> tuple[int, int]:
    """``"8x4096"`` -> ``(8, 4096)`` (batch, context); ``argparse.ArgumentTypeError`` for anything else."""
    m = _CELL.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a cell BATCHxCONTEXT such as 1x1024 or 8x4096")
    batch, context = int(m.group(1)), int(m.group(2))
    if batch < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the batch must be >= 1")
    if context < 16:
        raise argparse.ArgumentTypeError(f"{text!r}: the context must be >= 16")
    return batch, context


@dataclass
class PlanArg:
    """One ``--plan``: ``path`` (a plan file or folder) and the label given as ``LABEL=PATH`` (None: derived)."""

    path: str
    label: str | None = None


def parse_plan_arg(text: str) -> PlanArg:
    """``LABEL=PATH`` or ``PATH``. A value that is an existing path is a path even if it contains ``=``."""
    if os.path.exists(text) or "=" not in text:
        return PlanArg(text)
    label, _, path = text.partition("=")
    label = label.strip()
    if not label:
        raise argparse.ArgumentTypeError(f"{text!r}: empty label before '=' (use LABEL=PATH or just PATH)")
    if not path:
        raise argparse.ArgumentTypeError(f"{text!r}: no path after '=' (use LABEL=PATH or just PATH)")
    return PlanArg(path, label)


def plan_source_problem(path: str) -> str | None:
    """Why ``path`` is not a local plan file or plan folder (None when it is one)."""
    p = Path(path)
    if p.is_file():
        return None
    if p.is_dir():
        return None if (p / PLAN_FILENAME).is_file() else f"folder without {PLAN_FILENAME}"
    return "no such file or folder"


def check_label(label: str) -> str | None:
    """Why ``label`` cannot name a plan configuration (None when it can)."""
    if label == "stock" or label.startswith("stock@"):
        return "'stock' and 'stock@N' name the stock configurations"
    return None


def parse_chunk_size(text: str) -> int | str:
    """``--prefill-chunk-size``: ``auto`` (the runtime's default), ``0`` (one-shot prefill) or a positive int."""
    if text == AUTO:
        return AUTO
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 'auto', 0 (off) or a positive number of tokens") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 0 (0 = one-shot prefill)")
    return value


def beyond_positions(context: int, max_positions: int | None) -> bool:
    """Whether a ``context``-token prompt goes beyond the positions the model was trained on."""
    return max_positions is not None and context > max_positions


def beyond_note(max_positions: int | None) -> str:
    return (f"beyond the model's {max_positions} trained positions: speed and memory only, quality not claimed"
            if max_positions is not None else "")


def grid_cells(args) -> list[tuple[int, int]]:
    """The cells of a run: ``cells`` when it has them, else ``batch`` x ``context`` (also for JSONs of older runs,
    whose args have no ``cells``)."""
    cells = getattr(args, "cells", None)
    if cells is not None:
        return [tuple(c) for c in cells]
    return [(b, c) for b in (args.batch or DEFAULT_BATCH) for c in (args.context or DEFAULT_CONTEXT)]


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


def worker_spec(args, plan_path: str | None, warm: list[list[int]], decode_steps: int,
                fit_cap: int | None = None) -> dict[str, Any]:
    return {"model": args.model, "plan_path": plan_path, "threads": args.threads, "seed": args.seed,
            "decode_steps": decode_steps, "warm_prompt": warm, "prefill_chunk_size": args.prefill_chunk_size,
            "fit_cap": fit_cap, "decode_malloc": None if fit_cap else args.decode_malloc}


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
        "tokens_per_s_peak_phase": median([s.get("tokens_per_s_peak_phase", s["tokens_per_s"]) for s in samples]),
        "rate_malloc": sorted({s.get("rate_malloc", "as started") for s in samples}),
        "physical_bytes": samples[-1]["physical_bytes"],
        "theoretical_bytes": samples[-1]["theoretical_bytes"],
        "stock_bytes": samples[-1]["stock_bytes"],
        "kept_mean": samples[-1]["kept_mean"],
        "kept_max": samples[-1]["kept_max"],
        "baseline_rss": info["baseline_rss"],
        "peak_rss": peak,
        "peak_above_baseline": peak - info["baseline_rss"],
        "peak_method": "VmHWM after reset" if info["resettable"] else "ru_maxrss (includes model load)",
        "malloc_env": info.get("malloc_env"),
        "cpu_per_wall": median([s["cpu_per_wall"] for s in samples]),
        "samples": samples,
    }


def run_cell(ctx, args, plans, tokens: torch.Tensor, batch: int, context: int, generator,
             max_positions: int | None = None) -> dict[str, Any]:
    configs = cell_configs(plans, context)
    rounds = args.large_cell_repeats if batch * context >= args.large_cell_tokens else args.repeats
    warm = random_windows(tokens, batch, min(64, context), generator).tolist()
    beyond = beyond_positions(context, max_positions)
    log(f"cell batch {batch} x context {context}: {len(configs)} configurations, {rounds} round(s); starting workers"
        + (f" ({beyond_note(max_positions)})" if beyond else ""))
    workers: dict[str, Worker] = {}
    try:
        for cfg in configs:
            spec = worker_spec(args, cfg.plan_path, warm, args.decode_steps)
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
            "tokens_per_s_vs_limit_peak_phase": p["tokens_per_s_peak_phase"] / lim["tokens_per_s_peak_phase"],
            "peak_rss_vs_stock": p["peak_rss"] / stock["peak_rss"],
            "peak_above_baseline_vs_stock": p["peak_above_baseline"] / stock["peak_above_baseline"]
            if stock["peak_above_baseline"] > 0 else float("nan"),
            "physical_vs_theoretical": p["physical_bytes"] / p["theoretical_bytes"],
            "physical_vs_stock": p["physical_bytes"] / stock["stock_bytes"],
            "theoretical_vs_stock": p["theoretical_bytes"] / stock["stock_bytes"],
        }
    return {"batch": batch, "context": context, "rounds": rounds, "beyond_max_positions": beyond,
            "max_position_embeddings": max_positions, "configs": rows, "ratios": ratios}


# ----- memory-cap search ---------------------------------------------------------------------------------------------
@dataclass
class FitSearch:
    """Outcome of :func:`fit_search`: ``largest`` fitting length (0: not even one step fits), every probe in
    order as ``(length, fits)``, and whether the largest candidate (``maximum`` rounded down to a step) fit."""

    largest: int
    probes: list[tuple[int, bool]] = field(default_factory=list)
    reached_max: bool = False


def fit_search(fits: Callable[[int], bool], step: int, maximum: int, start: int | None = None) -> FitSearch:
    """Largest multiple of ``step`` in ``[step, maximum]`` for which ``fits(length)`` is True.

    Assumes ``fits`` is monotonic (whatever fits, every shorter length fits too). Exponential growth from ``start``
    (default ``step``; rounded down to a multiple of ``step``: start, 2 start, 4 start, ... capped at the largest
    multiple of ``step`` <= ``maximum``) until a length does not fit, then bisection between the last length that fit
    (0 if ``start`` did not) and the first that did not. Each length is probed at most once; ``ValueError`` if
    ``step < 1``, ``maximum < step`` or ``start`` is not in ``[step, maximum]``.
    """
    if step < 1 or maximum < step:
        raise ValueError(f"fit_search needs 1 <= step <= maximum (got step {step}, maximum {maximum})")
    if start is not None and not step <= start <= maximum:
        raise ValueError(f"fit_search needs step <= start <= maximum (got start {start}, step {step}, "
                         f"maximum {maximum})")
    top = maximum // step
    probes: list[tuple[int, bool]] = []

    def check(units: int) -> bool:
        ok = bool(fits(units * step))
        probes.append((units * step, ok))
        return ok

    good, bad = 0, None
    units = 1 if start is None else start // step
    while True:
        if not check(units):
            bad = units
            break
        good = units
        if units == top:
            break
        units = min(units * 2, top)
    if bad is not None:
        while bad - good > 1:
            mid = (good + bad) // 2
            if check(mid):
                good = mid
            else:
                bad = mid
    return FitSearch(largest=good * step, probes=probes, reached_max=good == top)


def fit_prompt(tokens: torch.Tensor, batch: int, length: int, seed: int) -> torch.Tensor:
    """The prompt every configuration gets for a ``length``-token probe (windows seeded by seed and length)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + length)
    return random_windows(tokens, batch, length, generator)


def fit_config(ctx, args, label: str, kind: str, plan_path: str | None, tokens: torch.Tensor,
               max_positions: int | None = None) -> dict[str, Any]:
    """The memory-cap search for one configuration (stock or a plan), in its own worker (restarted if it dies)."""
    cap = args.fit_cap * MIB
    warm = fit_prompt(tokens, args.fit_batch, 64, args.seed).tolist()
    spec = worker_spec(args, plan_path, warm, args.fit_decode_steps, fit_cap=cap)
    infos: list[dict[str, Any]] = []
    detail: list[dict[str, Any]] = []

    def start() -> Worker:
        with environ_set(FIT_WORKER_ENV):
            w = Worker(ctx, spec, f"{label} (memory-cap search)")
        try:
            info = w.wait_ready()
        except WorkerError:
            w.close()
            raise
        if not info.get("cap_enforced"):
            w.close()
            raise WorkerError(f"worker {label}: RLIMIT_AS is not enforced on this machine (an allocation larger than "
                              "the cap succeeded); the memory-cap search cannot run here")
        infos.append(info)
        log(f"  fit {label}: worker {info['pid']} ready, VmSize baseline {info['vm_baseline'] / MIB:.0f} MiB, "
            f"RLIMIT_AS {info['rlimit_as'] / MIB:.0f} MiB (cap {args.fit_cap} MiB), "
            f"RSS {info['baseline_rss'] / MIB:.0f} MiB")
        return w

    state = {"worker": start(), "restarts": 0}

    def fits(length: int) -> bool:
        prompt = fit_prompt(tokens, args.fit_batch, length, args.seed)
        t = time.perf_counter()
        try:
            reply = state["worker"].probe(prompt, args.fit_decode_steps)
        except WorkerDied as exc:
            state["restarts"] += 1
            state["worker"].close()
            if state["restarts"] > MAX_FIT_RESTARTS:
                raise WorkerError(f"{exc} (restarted {MAX_FIT_RESTARTS} times already; giving up)") from exc
            log(f"  fit {label}: {length} tokens: {exc}; restarting the worker")
            reply = {"fits": False, "result": None, "error": str(exc), "died": True}
            state["worker"] = start()
        info = infos[-1]
        row = {"length": length, "fits": reply["fits"], "error": reply.get("error"), "died": reply.get("died", False),
               "seconds": time.perf_counter() - t, "beyond_max_positions": beyond_positions(length, max_positions)}
        if reply.get("result"):
            r = reply["result"]
            row.update(prefill_s=r["prefill_s"], tokens_per_s=r["tokens_per_s"], peak_rss=r["peak_rss"],
                       peak_above_baseline=r["peak_rss"] - info["baseline_rss"], physical_bytes=r["physical_bytes"])
        if reply.get("vm_after") is not None:
            row["vm_after_above_baseline"] = reply["vm_after"] - info["vm_baseline"]
        detail.append(row)
        what = (f"fits (prefill {row['prefill_s']:.2f} s, peak RSS +{row['peak_above_baseline'] / MIB:.0f} MiB)"
                if reply["fits"] else f"does not fit ({row['error']})")
        log(f"  fit {label} b{args.fit_batch}: {length:>6} tokens {what} ({row['seconds']:.0f} s)")
        return reply["fits"]

    try:
        search = fit_search(fits, args.fit_step, args.fit_max, args.fit_start)
    finally:
        state["worker"].close()
    at_largest = next((d for d in detail if d["fits"] and d["length"] == search.largest), None)
    first = infos[0]
    return {
        "label": label,
        "kind": kind,
        "plan_path": plan_path,
        "batch": args.fit_batch,
        "largest_fit": search.largest,
        "reached_max": search.reached_max,
        "probes": detail,
        "restarts": state["restarts"],
        "cap": cap,
        "vm_baseline": first["vm_baseline"],
        "vm_before_priming": first["vm_before_priming"],
        "rlimit_as": first["rlimit_as"],
        "baseline_rss": first["baseline_rss"],
        "malloc_env": first.get("malloc_env"),
        "peak_above_baseline_at_largest": at_largest["peak_above_baseline"] if at_largest else None,
        "prefill_s_at_largest": at_largest["prefill_s"] if at_largest else None,
        "beyond_max_positions": beyond_positions(search.largest, max_positions),
    }


def fit_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Largest fitting prompt of each configuration / stock's (nan when stock fits nothing)."""
    stock = next((r for r in rows if r["kind"] == "stock"), None)
    if stock is None:
        return {}
    return {r["label"]: r["largest_fit"] / stock["largest_fit"] if stock["largest_fit"] else float("nan")
            for r in rows}


# ----- report --------------------------------------------------------------------------------------------------------
def mib(n: float) -> str:
    return f"{n / MIB:,.1f}"


def ctx_text(cell: dict[str, Any]) -> str:
    """A cell's context, marked † when it is beyond the model's trained positions."""
    return f"{cell['context']}†" if cell.get("beyond_max_positions") else str(cell["context"])


def cell_name(batch: int, context: int) -> str:
    return f"{batch}x{context}"


def eighth_plans(report: dict[str, Any]) -> list[str]:
    """Labels of the 8x plans (keep ratio 1/8) of a report."""
    return [label for label, p in report.get("plans", {}).items()
            if p.get("keep_ratio") is not None and abs(float(p["keep_ratio"]) - 0.125) < 1e-3]


def targets_block(report: dict[str, Any]) -> list[str]:
    """The compact "targets" lines for every 8x plan, from the cells that ran (empty without an 8x plan)."""
    cells = report["cells"]
    labels = [lab for lab in eighth_plans(report) if any(lab in c["ratios"] for c in cells)]
    if not labels:
        return []
    by_cell = {(c["batch"], c["context"]): c for c in cells}

    def fmt(x: float | None) -> str:
        return "n/a" if x is None or x != x else f"{x:.2f}"

    parts = ["## Targets (8x plans)", ""]
    for lab in labels:
        ran = [c for c in cells if lab in c["ratios"]]
        peak_cells = [by_cell[k] for k in TARGET_PEAK_CELLS if k in by_cell and lab in by_cell[k]["ratios"]]
        peak_note = ""
        if not peak_cells:  # none of the named long cells ran: every cell that did
            peak_cells, peak_note = ran, f" (none of {', '.join(cell_name(*k) for k in TARGET_PEAK_CELLS)} ran)"
        short = by_cell.get(TARGET_SHORT_CELL)
        short_note = ""
        if short is None or lab not in short["ratios"]:
            short = min(ran, key=lambda c: (c["batch"] * c["context"], c["batch"]))
            short_note = f" ({cell_name(*TARGET_SHORT_CELL)} did not run: smallest cell that did)"
        s = short["ratios"][lab]
        parts += [
            f"`{lab}`:",
            "",
            "- peak RSS above the loaded model, 8x ÷ stock: "
            + ", ".join(f"{cell_name(c['batch'], c['context'])}{'†' if c.get('beyond_max_positions') else ''} "
                        f"**{fmt(c['ratios'][lab]['peak_above_baseline_vs_stock'])}**" for c in peak_cells)
            + peak_note,
            "- decode tok/s, plan ÷ limit: "
            + ", ".join(f"{cell_name(c['batch'], c['context'])} {fmt(c['ratios'][lab]['tokens_per_s_vs_limit'])}"
                        for c in ran),
            f"- plan ÷ stock at {cell_name(short['batch'], short['context'])}{short_note}: decode tok/s "
            f"**{fmt(s['tokens_per_s_vs_stock'])}**, prefill time {fmt(s['prefill_vs_stock'])}, peak above baseline "
            f"{fmt(s['peak_above_baseline_vs_stock'])}",
            "",
        ]
    return parts


def setup_lines(report: dict[str, Any]) -> list[str]:
    """Allocator, prefill chunking and trained-positions notes (absent in JSONs of older runs: skipped)."""
    lines = []
    malloc = report.get("malloc")
    if malloc:
        env = ", ".join(f"`{k}={v}`" for k, v in malloc["expected_env"].items()) or "no MALLOC_* variables"
        seen = malloc.get("verified")
        lines.append(f"Allocator: `--malloc {malloc['choice']}` (workers started with {env}; "
                     + ("checked in every worker's /proc/<pid>/environ" if seen else
                        "NOT confirmed in every worker's /proc/<pid>/environ, see the JSON") + ").")
    decode_malloc = report.get("args", {}).get("decode_malloc")
    if decode_malloc == "keep":
        how = sorted({m for c in report["cells"] for cfg in c["configs"].values() for m in cfg.get("rate_malloc", [])})
        lines.append("Decode rates (`--decode-malloc keep`): timed after the peak is read, in the same worker and "
                     f"cache, {KEEP_WARM_STEPS} untimed steps after switching glibc malloc (`mallopt`) to keep freed "
                     "memory (mmap threshold 32 MiB, trim threshold 64 MiB: what a process with default settings "
                     "settles into), then restored. Under the peak measurement's own settings every allocation above "
                     "128 KiB is a fresh mapping and page-faults on each decode step; those rates are the "
                     "`tokens_per_s_peak_phase` entries of the JSON (column \"plan/limit, peak phase\"). "
                     f"Switched in: {', '.join(how) or 'n/a'}.")
    chunk = report.get("prefill_chunk")
    if chunk:
        sizes = {lab: size for lab, size in chunk["per_plan"].items()}
        uniq = sorted({s for s in sizes.values() if s}, key=int)
        if not uniq:
            how = "every plan prefills in one piece"
        elif len(uniq) == 1 and all(sizes.values()):
            how = f"prompts longer than {uniq[0]} tokens are prefilled in chunks of {uniq[0]}"
        else:
            how = "; ".join(f"`{lab}`: " + (f"chunks of {s}" if s else "one piece") for lab, s in sizes.items())
        lines.append(f"Prefill under a plan: `--prefill-chunk-size {chunk['flag']}` (runtime default "
                     f"{chunk['runtime_default']}): {how}; the stock cache always prefills in one piece.")
    max_pos = report.get("max_position_embeddings")
    flagged = [cell_name(c["batch"], c["context"]) for c in report["cells"] if c.get("beyond_max_positions")]
    if flagged:
        lines.append(f"† {', '.join(flagged)}: {beyond_note(max_pos)}.")
    return [line for item in lines for line in (item, "")]


def fit_ratio_text(row: dict[str, Any], stock: dict[str, Any] | None, ratio: float) -> str:
    """A configuration's fit ratio to stock, marked as a bound where either search stopped at --fit-max."""
    if ratio != ratio or stock is None:
        return "n/a"
    if row is stock:
        return f"{ratio:.2f}"
    if row["reached_max"] and stock["reached_max"]:
        return "n/a (both reached --fit-max)"
    return f"**{'>= ' if row['reached_max'] else '<= ' if stock['reached_max'] else ''}{ratio:.2f}**"


def fit_section(report: dict[str, Any]) -> list[str]:
    fit = report.get("fit")
    if not fit or not fit.get("rows"):
        return []
    rows_in = fit["rows"]
    ratios = fit_ratios(rows_in)
    stock = next((r for r in rows_in if r["kind"] == "stock"), None)
    max_pos = report.get("max_position_embeddings")
    rows = []
    for r in rows_in:
        note = []
        if r["reached_max"]:
            note.append("reached --fit-max (a lower bound)")
        if r["largest_fit"] == 0:
            note.append(f"not even {fit['step']} tokens fit")
        if r["beyond_max_positions"]:
            note.append("† beyond trained positions")
        if r["restarts"]:
            note.append(f"worker restarted {r['restarts']}x")
        rows.append([r["label"], f"{r['largest_fit']}{'†' if r['beyond_max_positions'] else ''}",
                     fit_ratio_text(r, stock, ratios.get(r["label"], float("nan"))), len(r["probes"]),
                     mib(r["vm_baseline"]), mib(r["rlimit_as"]),
                     mib(r["peak_above_baseline_at_largest"]) if r["peak_above_baseline_at_largest"] is not None
                     else "n/a",
                     f"{r['prefill_s_at_largest']:.2f}" if r["prefill_s_at_largest"] is not None else "n/a",
                     "; ".join(note)])
    parts = [
        "## Largest prompt under a memory cap",
        "",
        f"Cap: {fit['cap_mib']} MiB of address space above each worker's VmSize once the model is loaded and warmed "
        f"up (`RLIMIT_AS` = baseline + cap; virtual memory, so stricter than RSS). Batch {fit['batch']}, prefill + "
        f"{fit['decode_steps']} decode steps per probe, lengths multiples of {fit['step']} up to {fit['max']}: "
        "exponential growth then bisection, every probe of a configuration in the same worker, the same prompt "
        "windows for every configuration. An allocation failure is \"does not fit\". The search's workers start "
        f"with {', '.join(f'`{k}={v}`' for k, v in FIT_WORKER_ENV.items())} (one malloc arena: glibc cannot fall back "
        "to address space it reserved before the cap).",
        "",
        md_table(["config", "largest prompt that fits", "ratio to stock's", "probes", "VmSize baseline MiB",
                  "RLIMIT_AS MiB", "peak RSS above baseline at largest MiB", "prefill s at largest", "note"], rows),
        "",
    ]
    if any(r["beyond_max_positions"] for r in rows_in):
        parts += [f"† {beyond_note(max_pos)}.", ""]
    return parts


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
    ]
    if cells:
        parts += [
            f"Per cell: random windows of real text (`{args.data}`), one prefill + {args.decode_steps} greedy decode "
            f"steps per measurement, medians of {'/'.join(str(r) for r in rounds)} interleaved round(s) "
            f"({args.large_cell_repeats} where batch x context >= {args.large_cell_tokens}). Every configuration "
            "runs in its own worker process. `limit` = stock cache on the plan's compressed length (context x keep). "
            f"Total wall time {report.get('wall_seconds', 0) / 60:.1f} min.",
            "",
        ]
    else:
        parts += [f"Total wall time {report.get('wall_seconds', 0) / 60:.1f} min.", ""]
    parts += setup_lines(report)
    if cells:
        parts += targets_block(report)
        parts += ["## Speed (plan vs stock at the full context, and vs the limit)", ""]
        rows = []
        for c in cells:
            st = c["configs"]["stock"]
            for label, r in c["ratios"].items():
                p = c["configs"][label]
                lim = c["configs"][f"stock@{r['limit_length']}"]
                peak_phase = r.get("tokens_per_s_vs_limit_peak_phase")
                rows.append([c["batch"], ctx_text(c), label, f"{r['keep_ratio']:g}", r["limit_length"],
                             f"{st['prefill_s']:.2f} / {p['prefill_s']:.2f}", f"{r['prefill_vs_stock']:.2f}",
                             f"{st['tokens_per_s']:.1f} / {p['tokens_per_s']:.1f} / {lim['tokens_per_s']:.1f}",
                             f"**{r['tokens_per_s_vs_stock']:.2f}**", f"{r['tokens_per_s_vs_limit']:.2f}",
                             "n/a" if peak_phase is None else f"{peak_phase:.2f}"])
        parts.append(md_table(["batch", "context", "plan", "keep", "limit len", "prefill s stock / plan",
                               "prefill plan/stock", "decode tok/s stock / plan / limit", "decode plan/stock",
                               "decode plan/limit", "plan/limit, peak phase"], rows))
        parts += ["", "## Memory (peak process RSS and KV bytes right after the prefill)", ""]
        rows = []
        for c in cells:
            st = c["configs"]["stock"]
            for label, r in c["ratios"].items():
                p = c["configs"][label]
                rows.append([c["batch"], ctx_text(c), label, f"{r['keep_ratio']:g}",
                             f"{mib(st['peak_rss'])} / {mib(p['peak_rss'])}", f"{r['peak_rss_vs_stock']:.2f}",
                             f"{mib(st['peak_above_baseline'])} / {mib(p['peak_above_baseline'])}",
                             f"{r['peak_above_baseline_vs_stock']:.2f}",
                             f"{mib(p['physical_bytes'])} / {mib(p['theoretical_bytes'])} / {mib(st['stock_bytes'])}",
                             f"{r['physical_vs_theoretical']:.3f}", f"**{r['physical_vs_stock']:.3f}**"])
        parts.append(md_table(["batch", "context", "plan", "keep", "peak RSS MiB stock / plan", "peak plan/stock",
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
                rows.append([c["batch"], ctx_text(c), label, cfg["length"], cfg["rounds"], f"{cfg['prefill_s']:.2f}",
                             f"{cfg['tokens_per_s']:.1f}", f"{cfg['decode_s']:.3f}", mib(cfg["physical_bytes"]),
                             f"{cfg['kept_mean']:.1f}", cfg["kept_max"], mib(cfg["baseline_rss"]),
                             mib(cfg["peak_rss"]), f"{cfg['cpu_per_wall']:.2f}"])
        parts.append(md_table(["batch", "context", "config", "prompt tokens", "rounds", "prefill s", "decode tok/s",
                               "decode s", "KV MiB after prefill", "mean kept", "max kept", "baseline RSS MiB",
                               "peak RSS MiB", "cpu/wall"], rows))
        loads = [s["loadavg_1min"] for c in cells for cfg in c["configs"].values() for s in cfg["samples"]]
        parts += ["", f"`cpu/wall` = CPU seconds of the worker per wall second of a measurement (about {args.threads} "
                  f"on otherwise idle cores; lower means the cores were shared). 1-minute load average during the "
                  f"measurements: {min(loads):.1f}-{max(loads):.1f} on {report['environment']['cpu_count']} CPUs.",
                  ""]
    parts += fit_section(report)
    return "\n".join(parts).rstrip("\n") + "\n"


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
                    "cache (and vs stock decoding at the compressed length), for a list of cells batch x context; "
                    "optionally the largest prompt each fits under a memory cap (--fit-cap). Each configuration runs "
                    "in its own worker process; markdown on stdout, progress on stderr.",
    )
    p.add_argument("--model", default="smollm2-135m", help="recipe alias or local HF model directory (default: %(default)s)")
    p.add_argument("--plan", action="append", default=[], type=parse_plan_arg, metavar="[LABEL=]PATH",
                   help="plan file or plan folder (holding plan.safetensors), optionally labelled LABEL=PATH "
                        "(repeatable; required unless --from-json). Without a label: the file or folder name and "
                        "the plan's target ratio")
    p.add_argument("--from-json", type=Path, default=None,
                   help="measure nothing: re-render --markdown/--png from a JSON this script wrote (e.g. after "
                        "--passkey-json appeared)")
    p.add_argument("--cells", type=parse_cell, nargs="+", default=None, metavar="BxC",
                   help="explicit cells batch x context, e.g. 1x1024 1x8192 8x4096 (instead of --batch x --context); "
                        "a context beyond the model's max_position_embeddings runs but is flagged (speed and memory "
                        "only)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help=f"batch sizes, crossed with --context (default: {' '.join(map(str, DEFAULT_BATCH))})")
    p.add_argument("--context", type=int, nargs="+", default=None,
                   help=f"contexts, crossed with --batch (default: {' '.join(map(str, DEFAULT_CONTEXT))})")
    p.add_argument("--decode-steps", type=int, default=16, help="timed greedy decode steps (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per cell (default: %(default)s)")
    p.add_argument("--large-cell-tokens", type=int, default=32768,
                   help="cells with batch x context >= this run --large-cell-repeats rounds (default: %(default)s)")
    p.add_argument("--large-cell-repeats", type=int, default=1, help="rounds for large cells (default: %(default)s)")
    p.add_argument("--prefill-chunk-size", type=parse_chunk_size, default=AUTO, metavar="N",
                   help="passed to runtime.apply_plan for every plan: 'auto' (the runtime's default: chunks of "
                        f"{DEFAULT_PREFILL_CHUNK_SIZE} for prompts longer than that), 0 (one-shot prefill) or a "
                        "number of tokens (default: %(default)s)")
    p.add_argument("--malloc", choices=("default", "trim"), default="trim",
                   help="glibc malloc of the workers: 'trim' starts them with MALLOC_MMAP_THRESHOLD_=131072 and "
                        "MALLOC_TRIM_THRESHOLD_=131072 (freed memory goes back to the OS), 'default' without either "
                        "(default: %(default)s)")
    p.add_argument("--decode-malloc", choices=("keep", "same"), default="keep",
                   help="what the decode rate is timed under: 'keep' times it after the peak is read, with glibc "
                        "switched (mallopt) to keep freed memory (32 MiB mmap / 64 MiB trim thresholds, as a process "
                        "with default settings settles into); 'same' times the decode steps of the peak measurement, "
                        "under --malloc (default: %(default)s)")
    p.add_argument("--fit-cap", type=int, default=None, metavar="MiB",
                   help="also find, for stock and each plan, the largest prompt whose prefill + --fit-decode-steps "
                        "decode steps run under a cap of this many MiB of address space (RLIMIT_AS) above the loaded "
                        "worker. Without --cells/--batch/--context only this search runs")
    p.add_argument("--fit-batch", type=int, default=1, help="batch of the memory-cap search (default: %(default)s)")
    p.add_argument("--fit-max", type=int, default=32768,
                   help="longest prompt the memory-cap search tries (default: %(default)s)")
    p.add_argument("--fit-step", type=int, default=256,
                   help="the memory-cap search probes multiples of this many tokens (default: %(default)s)")
    p.add_argument("--fit-start", type=int, default=None,
                   help="first length the memory-cap search probes (default: --fit-step); it grows by doubling from "
                        "there, or bisects below it if it does not fit. Saves the slow short probes when the "
                        "region of interest is known")
    p.add_argument("--fit-decode-steps", type=int, default=4,
                   help="decode steps after each probe's prefill (default: %(default)s)")
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
    for name in ("decode_steps", "repeats", "large_cell_repeats", "threads", "large_cell_tokens", "fit_batch",
                 "fit_max", "fit_step", "fit_decode_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.fit_cap is not None and args.fit_cap < 1:
        p.error("--fit-cap must be >= 1 (MiB)")
    if args.fit_max < args.fit_step:
        p.error(f"--fit-max ({args.fit_max}) must be >= --fit-step ({args.fit_step})")
    if args.fit_start is not None and not args.fit_step <= args.fit_start <= args.fit_max:
        p.error(f"--fit-start must be between --fit-step ({args.fit_step}) and --fit-max ({args.fit_max})")
    for b in args.batch or []:
        if b < 1:
            p.error(f"--batch values must be >= 1 (got {b})")
    for c in args.context or []:
        if c < 16:
            p.error(f"--context values must be >= 16 (got {c})")
    if args.cells is not None:
        if args.batch is not None or args.context is not None:
            p.error("--cells replaces --batch/--context: give either --cells or --batch/--context")
        seen: set[tuple[int, int]] = set()
        for cell in args.cells:
            if cell in seen:
                p.error(f"--cells: {cell_name(*cell)} is given twice")
            seen.add(cell)
    elif args.fit_cap is not None and args.batch is None and args.context is None:
        args.cells = []  # only the memory-cap search
    else:
        args.cells = grid_cells(args)
    if args.from_json is not None:
        if not args.from_json.is_file():
            p.error(f"--from-json {args.from_json}: no such file")
    elif not args.plan:
        p.error("--plan is required (or --from-json to re-render a finished run)")
    labels: set[str] = set()
    for plan in args.plan:
        problem = plan_source_problem(plan.path)
        if problem:
            p.error(f"--plan {plan.path}: {problem}")
        if plan.label is not None:
            why = check_label(plan.label)
            if why:
                p.error(f"--plan {plan.label}={plan.path}: {why}; pick another label")
            if plan.label in labels:
                p.error(f"--plan: label {plan.label!r} is given twice")
            labels.add(plan.label)
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


def json_args(args) -> dict[str, Any]:
    """``args`` as JSON values (paths as text, plans as ``LABEL=PATH`` or ``PATH``, cells as ``[batch, context]``)."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if isinstance(value, Path):
            value = str(value)
        elif key == "plan":
            value = [f"{pl.label}={pl.path}" if pl.label else pl.path for pl in value]
        elif key == "cells" and value is not None:
            value = [list(c) for c in value]
        out[key] = value
    return out


def rerender(args) -> int:
    """--from-json: rebuild the markdown (stdout, --markdown) and the figure (--png) of a finished run."""
    report = json.loads(args.from_json.read_text())
    saved = argparse.Namespace(**{**report["args"], "data": Path(report["args"]["data"])})
    saved.passkey_json = args.passkey_json
    report["passkey_cases"] = passkey_cases(args.passkey_json)
    text = render_markdown(report, saved)
    if not report.get("complete", True):
        done = {(c["batch"], c["context"]) for c in report["cells"]}
        missing = [f"batch {b} x context {c}" for b, c in grid_cells(saved) if (b, c) not in done]
        text = ("**PARTIAL: the run stopped before the end of its cells; not measured: "
                + (", ".join(missing) or "none") + ".**\n\n" + text)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.png:
        if report["cells"]:
            plot(report, load_fidelity(args.fidelity_json), load_fidelity(args.passkey_json), args.png)
            log(f"figure written to {args.png}")
        else:
            log(f"no cells in {args.from_json}: no figure")
    return 0


def malloc_record(choice: str, expected: dict[str, str], report: dict[str, Any],
                  inherited: dict[str, str | None]) -> dict[str, Any]:
    """What every worker of the run started with (``MALLOC_*`` of ``/proc/<pid>/environ``), and whether that is
    ``expected`` (plus :data:`FIT_WORKER_ENV` for the workers of the memory-cap search); ``inherited``: what the
    parent's own environment had (replaced for the workers)."""
    cells = [cfg.get("malloc_env") for c in report["cells"] for cfg in c["configs"].values()]
    fits = [r.get("malloc_env") for r in report.get("fit", {}).get("rows", [])]
    fit_expected = {**expected, **FIT_WORKER_ENV}
    return {"choice": choice, "expected_env": expected, "fit_expected_env": fit_expected,
            "inherited_env": inherited,
            "worker_envs": sorted({json.dumps(s, sort_keys=True) for s in cells}),
            "fit_worker_envs": sorted({json.dumps(s, sort_keys=True) for s in fits}),
            "verified": bool(cells or fits) and all(s == expected for s in cells)
            and all(s == fit_expected for s in fits)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json is not None:
        return rerender(args)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    log(f"loading {args.model} once in the parent (plans are validated against it; workers load their own copy)")
    loaded = load_model(args.model)
    max_positions = getattr(loaded.model.config, "max_position_embeddings", None)
    longest = max([c for _, c in args.cells] + ([args.fit_max] if args.fit_cap is not None else []))
    plans: list[tuple[str, str, float]] = []
    plans_json = {}
    chunks = {}
    for arg in args.plan:
        path = arg.path
        try:
            plan = runtime.load_plan(path)
            plan.validate(loaded.model)
        except runtime.PlanError as exc:
            raise SystemExit(f"speed_memory: plan {path}: {exc}") from exc
        label = arg.label or plan_label(path, plan)
        if check_label(label):
            raise SystemExit(f"speed_memory: plan {path}: label {label!r}: {check_label(label)}; give one as "
                             "LABEL=PATH")
        ratio = compressed_ratio(plan, loaded.model.config, longest, model_dtype(loaded.model))
        plans.append((label, str(path), ratio))
        chunks[label] = resolve_chunk_size(args.prefill_chunk_size, plan)
        plans_json[label] = {"path": str(path), "target_ratio": plan.target_ratio, "keep_ratio": ratio,
                             "prefill_chunk_size": chunks[label]}
    if len({label for label, _, _ in plans}) != len(plans):
        raise SystemExit("speed_memory: two --plan files have the same label; pass each plan once (or label them "
                         "LABEL=PATH)")
    env = environment(loaded.model)
    log(f"tokenizing {args.data}")
    tokens = load_token_stream(args.data, loaded.tokenizer)
    if len(tokens) < longest:
        raise SystemExit(f"speed_memory: {args.data} has {len(tokens)} tokens, fewer than the longest prompt "
                         f"{longest}")
    del loaded
    gc.collect()
    ctx = mp.get_context("spawn")
    generator = torch.Generator().manual_seed(args.seed + 1)
    report: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "model": args.model,
        "args": json_args(args),
        "environment": env,
        "max_position_embeddings": max_positions,
        "plans": plans_json,
        "prefill_chunk": {"flag": args.prefill_chunk_size, "runtime_default": DEFAULT_PREFILL_CHUNK_SIZE,
                          "per_plan": chunks},
        "data_tokens": len(tokens),
        "cells": [],
    }
    if args.fit_cap is not None:
        report["fit"] = {"cap_mib": args.fit_cap, "batch": args.fit_batch, "max": args.fit_max, "step": args.fit_step,
                         "decode_steps": args.fit_decode_steps, "rows": []}
    inherited = {k: os.environ.get(k) for k in (*MALLOC_TRIM_ENV, *FIT_WORKER_ENV)}
    with worker_malloc_env(args.malloc) as expected_env:
        log(f"workers' malloc: {args.malloc} ({expected_env or 'no MALLOC_* variables'})")
        try:
            for batch, context in args.cells:
                t = time.perf_counter()
                cell = run_cell(ctx, args, plans, tokens, batch, context, generator, max_positions)
                cell["wall_seconds"] = time.perf_counter() - t
                report["cells"].append(cell)
                report["wall_seconds"] = time.perf_counter() - start
                report["malloc"] = malloc_record(args.malloc, expected_env, report, inherited)
                write_outputs(report, args, final=False)
                log(f"cell batch {batch} x context {context} done in {cell['wall_seconds']:.0f} s; "
                    + "; ".join(f"{lab}: decode x{r['tokens_per_s_vs_stock']:.2f} vs stock, "
                                f"x{r['tokens_per_s_vs_limit']:.2f} vs limit" for lab, r in cell["ratios"].items()))
            if args.fit_cap is not None:
                log(f"memory-cap search: cap {args.fit_cap} MiB above the loaded worker, batch {args.fit_batch}, "
                    f"multiples of {args.fit_step} up to {args.fit_max}")
                for label, kind, path in [("stock", "stock", None), *((lab, "plan", pa) for lab, pa, _ in plans)]:
                    t = time.perf_counter()
                    row = fit_config(ctx, args, label, kind, path, tokens, max_positions)
                    row["wall_seconds"] = time.perf_counter() - t
                    report["fit"]["rows"].append(row)
                    report["wall_seconds"] = time.perf_counter() - start
                    report["malloc"] = malloc_record(args.malloc, expected_env, report, inherited)
                    write_outputs(report, args, final=False)
                    log(f"fit {label}: largest prompt that fits {row['largest_fit']}"
                        + (" (reached --fit-max)" if row["reached_max"] else "")
                        + f", {len(row['probes'])} probes in {row['wall_seconds']:.0f} s")
        except WorkerError as exc:
            raise SystemExit(f"speed_memory: {exc}") from exc
        report["malloc"] = malloc_record(args.malloc, expected_env, report, inherited)
    if not report["malloc"]["verified"]:
        log(f"warning: not every worker started with the expected malloc environment: "
            f"{report['malloc']['worker_envs']} {report['malloc']['fit_worker_envs']}")
    report["wall_seconds"] = time.perf_counter() - start
    text = write_outputs(report, args, final=True)
    print(text)
    if args.png:
        if report["cells"]:
            plot(report, load_fidelity(args.fidelity_json), load_fidelity(args.passkey_json), args.png)
            log(f"figure written to {args.png}")
        else:
            log("no cells ran: no figure")
    log(f"done in {report['wall_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
