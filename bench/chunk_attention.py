"""Time and transient memory of one long chunk's attention in a PyramidInfer layer: plain blocks vs the fused path.

    python bench/chunk_attention.py --queries 4096 --held 512 --window 32

One chunk of ``--queries`` queries (SmolLM2-135M's heads: 9 query heads, 3 KV heads, head size 64, float32) over the
``--held`` slots a layer kept plus the chunk's own tokens, causal, through ``runtime.pyramidinfer.attend`` with the
moving average's fold weights (what a later chunk of a chunked prefill computes in each layer). ``plain``: blocks of
plain attention (what a CPU runs); ``fused``: SDPA with the chunk's mask and only the queries within the fold
horizon scored (what an accelerator runs; forced here). Each mode runs in its own process: after a warm-up call, the
RSS high-water mark is reset and ``--repeats`` calls are timed; prints seconds per call and the peak RSS above the
process's RSS before the calls. Timings only mean something on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(mode: str, queries: int, held: int, window: int, repeats: int, threads: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch

    import runtime.pyramidinfer as pyramidinfer
    from bench.prefill_memory import proc_status, reset_peak

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n_q, n_kv, dim = 9, 3, 64
    total = held + queries
    query = torch.randn(1, n_q, queries, dim)
    keys, values = torch.randn(1, n_kv, total, dim), torch.randn(1, n_kv, total, dim)
    mask = pyramidinfer.ChunkMask(torch.ones(1, 1, held, dtype=torch.bool), None, queries)
    fold = pyramidinfer.fold_weights(queries, window)
    if mode == "fused":
        pyramidinfer.fused_chunk_attention = lambda device: True  # this process only
    with torch.inference_mode():
        pyramidinfer.attend(query, keys, values, mask, dim**-0.5, "max", False, fold=fold)  # warm-up
        reset_peak()
        base = proc_status()["VmRSS"]
        start = time.perf_counter()
        for _ in range(repeats):
            pyramidinfer.attend(query, keys, values, mask, dim**-0.5, "max", False, fold=fold)
        seconds = (time.perf_counter() - start) / repeats
    print(f"| {mode} | {queries} | {total} | {seconds:.2f} | {(proc_status()['VmHWM'] - base) // 2**20} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--queries", type=int, default=4096, help="queries in the chunk (default: %(default)s)")
    p.add_argument("--held", type=int, default=512, help="slots held before the chunk (default: %(default)s)")
    p.add_argument("--window", type=int, default=32, help="the plan's window (fold weights) (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=("plain", "fused"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.queries, args.held + 1, args.window, args.repeats, args.threads) < 1:
        p.error("--queries, --window, --repeats and --threads must be positive, --held >= 0")
    if args.mode is not None:
        measure(args.mode, args.queries, args.held, args.window, args.repeats, args.threads)
        return 0
    print("| mode | queries | slots | seconds per call | peak RSS above MiB |")
    print("|---|---|---|---|---|")
    for mode in ("plain", "fused"):
        subprocess.run([sys.executable, __file__, "--mode", mode, "--queries", str(args.queries), "--held",
                        str(args.held), "--window", str(args.window), "--repeats", str(args.repeats), "--threads",
                        str(args.threads)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
