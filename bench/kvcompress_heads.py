"""Per-(layer, KV head) budgets of KV-Compress plans: a table and a heatmap PNG.

    python bench/kvcompress_heads.py artifacts/smollm2-135m-kvc-r0.25.safetensors \
        artifacts/smollm2-135m-kvc-r0.125.safetensors --png artifacts/kvcompress_heads.png

For every plan: each head's kept fraction ``f_lh = min(1, head_keep[l, h] * H_kv * layer_keep[l])`` (the runtime's
rule, ``runtime.kvcompress.head_fractions``), which heads keep the whole context (``f = 1``), and — when the plan
holds them — the calibration's captured attention mass per head. The PNG shows ``f`` as one heatmap per plan
(layers down, KV heads across; full-context heads marked with a dot).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import runtime  # noqa: E402
from runtime.kvcompress import head_fractions  # noqa: E402


def fractions(plan: runtime.Plan) -> torch.Tensor:
    """float64 ``[L, H_kv]`` kept fraction of every head."""
    layers = plan.tensors["kvcompress.head_keep"].shape[0]
    return torch.tensor([head_fractions(plan, layer) for layer in range(layers)], dtype=torch.float64)


def table(plan: runtime.Plan, name: str) -> str:
    f = fractions(plan)
    full = f >= 1.0
    mass = plan.tensors.get("kvcompress.captured_mass")
    lines = [f"## {name}", "",
             f"target ratio {plan.target_ratio}, mean head fraction {float(f.mean()):.4f}; "
             f"**{int(full.sum())} of {f.numel()} heads keep the whole context** "
             f"(layers {sorted({int(l) for l in full.nonzero()[:, 0]})})", "",
             "| layer | layer keep | " + " | ".join(f"head {h}" for h in range(f.shape[1])) + " |",
             "|---|---|" + "---|" * f.shape[1]]
    for layer in range(f.shape[0]):
        cells = []
        for head in range(f.shape[1]):
            cell = f"{float(f[layer, head]):.3f}" + (" (all)" if bool(full[layer, head]) else "")
            if mass is not None:
                cell += f", mass {float(mass[layer, head]):.2f}"
            cells.append(cell)
        lines.append(f"| {layer} | {float(f[layer].mean()):.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def heatmap(plans: list[tuple[str, runtime.Plan]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(plans), figsize=(2.2 + 1.6 * len(plans), 7), squeeze=False)
    image = None
    for ax, (name, plan) in zip(axes[0], plans):
        f = fractions(plan)
        image = ax.imshow(f.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        full = (f >= 1.0).nonzero()
        ax.scatter(full[:, 1].numpy(), full[:, 0].numpy(), s=14, c="white", marker="o", label="whole context")
        full_count = int((f >= 1.0).sum())
        ax.set_title(f"ratio {plan.target_ratio}\n{full_count} whole-context heads", fontsize=9)
        ax.set_xlabel("KV head")
        ax.set_xticks(range(f.shape[1]))
        ax.set_ylabel("layer")
    fig.suptitle("KV-Compress per-head kept fraction (white dot: whole context)", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), label="kept fraction of the context")
    fig.savefig(out, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plans", nargs="+", help="plan files with kvcompress")
    p.add_argument("--png", type=Path, help="write the heatmap here")
    p.add_argument("--markdown", type=Path, help="also write the tables here")
    args = p.parse_args(argv)
    loaded = [(Path(path).stem, runtime.load_plan(path)) for path in args.plans]
    for name, plan in loaded:
        if "kvcompress" not in plan.methods:
            p.error(f"{name}: the plan has no kvcompress method")
    text = "\n\n".join(table(plan, name) for name, plan in loaded)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    if args.png:
        heatmap(loaded, args.png)
        print(f"\nwrote {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
