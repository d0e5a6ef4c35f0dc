"""Where a prefill's memory goes: resident memory at the hooks of one decoder layer during one forward.

    python bench/prefill_memory.py --plan artifacts/smollm2-135m-all-8x --batch 8 --context 4096 --layer 29
    python bench/prefill_memory.py --plan stock --batch 1 --context 8192 --layer 5

Loads the model, applies the plan (``stock``: none), resets the kernel's RSS high-water mark
(``/proc/self/clear_refs`` <- 5) and runs one forward over ``batch x context`` random token ids with
``logits_to_keep=1`` after a 64-token warm-up (what ``generate``'s prefill runs; with a plan, prompts longer than the
chunk size are chunked as by default). At the entry of the chosen decoder layer the high-water mark is reset again; then, at the entry and
exit of its q/k/v/o projections, of the attention function and of its MLP, and at the layer's exit, it prints the RSS
and the high-water mark since the layer's entry, both above the RSS before the forward (MiB). With chunked prefill
the layer runs once per chunk; every run is printed. The process re-executes itself with glibc's
``MALLOC_MMAP_THRESHOLD_=131072 MALLOC_TRIM_THRESHOLD_=131072`` (as ``bench/speed_memory.py --malloc trim``), so freed
memory goes back to the OS and the RSS follows what is alive. Linux only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import runtime  # noqa: E402
import runtime.attention as attention  # noqa: E402
from runtime.models import load_model, resolve_model_spec  # noqa: E402

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
MIB = 2**20


def proc_status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plan", required=True, help="a plan file or folder, or 'stock'")
    p.add_argument("--model", default="smollm2-135m", help="model alias (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--layer", type=int, default=5, help="decoder layer to probe (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.batch < 1 or args.context < 1:
        p.error("--batch and --context must be >= 1")
    if not os.path.exists("/proc/self/clear_refs"):
        p.error("needs Linux's /proc/self/clear_refs")
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    torch.set_num_threads(args.threads)
    model = load_model(resolve_model_spec(args.model), progress=False).model
    layers = model.model.layers
    if not 0 <= args.layer < len(layers):
        p.error(f"--layer must be in 0..{len(layers) - 1}")
    ids = torch.randint(100, model.config.vocab_size - 1, (args.batch, args.context),
                        generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():  # warm-up: one-time allocations (thread pools, kernels' scratch) before measuring
        model(ids[:1, :64], use_cache=True, logits_to_keep=1)
    events: list[tuple[str, int, int]] = []
    base = [0]

    def mark(name: str) -> None:
        s = proc_status()
        events.append((name, s["VmRSS"] - base[0], s["VmHWM"] - base[0]))

    def layer_in(module, args_):
        reset_peak()
        mark("layer in")

    layer = layers[args.layer]
    handles = [layer.register_forward_pre_hook(layer_in),
               layer.register_forward_hook(lambda m, a, o: mark("layer out"))]
    attn = layer.self_attn
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        module = getattr(attn, name, None)
        if module is not None:
            handles.append(module.register_forward_pre_hook(lambda m, a, n=name: mark(f"{n} in")))
            handles.append(module.register_forward_hook(lambda m, a, o, n=name: mark(f"{n} out")))
    handles.append(layer.mlp.register_forward_pre_hook(lambda m, a: mark("mlp in")))
    handles.append(layer.mlp.register_forward_hook(lambda m, a, o: mark("mlp out")))
    original = attention.kvplan_attention

    def probed(module, *a, **k):
        if getattr(module, "layer_idx", None) == args.layer:
            mark("attention in")
        out = original(module, *a, **k)
        if getattr(module, "layer_idx", None) == args.layer:
            mark("attention out")
        return out

    applied = contextlib.nullcontext()
    if args.plan != "stock":
        attention.kvplan_attention = probed  # the function apply_plan registers (read at registration)
        applied = runtime.apply_plan(model, runtime.load_plan(args.plan))
    with torch.inference_mode(), applied:
        reset_peak()
        base[0] = proc_status()["VmRSS"]
        model(ids, use_cache=True, logits_to_keep=1)
        total = proc_status()["VmHWM"] - base[0]
    for handle in handles:
        handle.remove()
    print(f"{args.plan}, batch {args.batch} x context {args.context}, layer {args.layer}: MiB above the RSS before the "
          f"forward (peak of the whole forward: {total / MIB:.0f} MiB)")
    print(f"{'event':<16} {'RSS':>8} {'peak since layer in':>20}")
    for name, rss, hwm in events:
        print(f"{name:<16} {rss / MIB:8.0f} {hwm / MIB:20.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
