import sys, time, warnings, torch, transformers
sys.path.insert(0, ".")
warnings.simplefilter("ignore")
from transformers import DynamicCache
import runtime
from runtime.cache import cache_argument
from torch.profiler import profile, ProfilerActivity
cfg = transformers.AutoConfig.from_pretrained(".gpu/smollm2-135m")
torch.manual_seed(0)
model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()
name = cache_argument(model)
ids = torch.randint(100, 40000, (8, 4096)).cuda()
for label, path in (("stock", None), ("pyramid-8x", "artifacts/smollm2-135m-r0.125.safetensors"), ("all-8x", "artifacts/smollm2-135m-all-8x/plan.safetensors")):
    plan = runtime.load_plan(path) if path else None
    ctx = runtime.apply_plan(model, plan) if plan else __import__("contextlib").nullcontext()
    with torch.inference_mode(), ctx:
        cache = DynamicCache(config=model.config)
        out = model(ids, use_cache=True, logits_to_keep=1, **{name: cache}); tok = out.logits[:, -1:].argmax(-1)
        for _ in range(3):
            out = model(tok, use_cache=True, **{name: cache}); tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(8):
                out = model(tok, use_cache=True, **{name: cache}); tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
    ka = prof.key_averages()
    cpu_total = sum(e.self_cpu_time_total for e in ka) / 8 / 1000
    cuda_total = sum(getattr(e, "self_device_time_total", 0) for e in ka) / 8 / 1000
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")) / 8
    syncs = {e.key: e.count / 8 for e in ka if "Synchronize" in e.key or e.key in ("aten::item", "aten::_local_scalar_dense", "cudaMemcpyAsync")}
    print(f"== {label}: per step: CPU self {cpu_total:.1f} ms, GPU kernels {cuda_total:.2f} ms, launches {launches:.0f}, syncs/copies {syncs}")
    print(ka.table(sort_by="self_cpu_time_total", row_limit=12))
