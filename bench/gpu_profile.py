"""Where a decode step's time goes on a GPU: host time vs kernel time, kernel launches and host synchronisations.

    python bench/gpu_profile.py --config CONFIG_DIR --plan pyramid-8x=artifacts/smollm2-135m-r0.125.safetensors \
        --batch 8 --context 4096

Builds the model from ``CONFIG_DIR/config.json`` with random weights (as ``bench/gpu_decode.py``), prefills
``--context`` random tokens for stock and each plan, runs 3 untimed decode steps, then ``--steps`` decode steps under
``torch.profiler`` (CPU and CUDA). Prints per decode step: the host's self time of every profiled operation summed
(inflated by the profiler itself), the GPU kernels' time, the kernel launches, and the host synchronisations and
copies (``aten::item``, ``cudaStreamSynchronize``, ``cudaMemcpyAsync``), then the profiler's table of the busiest
operations.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import runtime  # noqa: E402
from bench.gpu_decode import DTYPES, parse_plan  # noqa: E402
from runtime.cache import cache_argument  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
SYNCS = ("aten::item", "cudaStreamSynchronize", "cudaMemcpyAsync")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--config", type=Path, required=True, help="folder with the model's config.json")
    p.add_argument("--plan", action="append", default=[], type=parse_plan, metavar="[LABEL=]PATH")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8, help="profiled decode steps (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--rows", type=int, default=12, help="rows of the profiler's table (default: %(default)s)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    warnings.simplefilter("ignore")  # random weights: "the model's weights differ" is expected
    config = transformers.AutoConfig.from_pretrained(args.config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype]).cuda().eval()
    name = cache_argument(model)
    ids = torch.randint(100, config.vocab_size - 100, (args.batch, args.context)).cuda()
    for label, path in [("stock", None), *args.plan]:
        plan = runtime.load_plan(str(path)) if path is not None else None
        with torch.inference_mode(), (runtime.apply_plan(model, plan) if plan is not None else nullcontext()):
            cache = DynamicCache(config=model.config)
            out = model(ids, use_cache=True, logits_to_keep=1, **{name: cache})
            token = out.logits[:, -1:].argmax(-1)
            for _ in range(3):
                out = model(token, use_cache=True, **{name: cache})
                token = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    out = model(token, use_cache=True, **{name: cache})
                    token = out.logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
        events = prof.key_averages()
        per_step = 1000 * args.steps
        host = sum(e.self_cpu_time_total for e in events) / per_step
        kernels = sum(getattr(e, "self_device_time_total", 0) for e in events) / per_step
        launches = sum(e.count for e in events if e.key in LAUNCHES) / args.steps
        syncs = {e.key: e.count / args.steps for e in events if e.key in SYNCS}
        print(f"== {label}: per decode step: host self time {host:.1f} ms, GPU kernels {kernels:.2f} ms, "
              f"{launches:.0f} kernel launches, syncs/copies {syncs}")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
        del cache, out, token
    return 0


if __name__ == "__main__":
    sys.exit(main())
