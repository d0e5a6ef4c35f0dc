"""What a plan holds, read from the plan alone (no model): ``python -m runtime inspect PLAN``.

:func:`describe` turns a plan into one JSON-ready dict (the model it was made for, its methods and parameters, one
row per layer, the KVSharer sharing map, the theoretical KV bytes at a context and batch, the provenance);
:func:`render_text` prints it; :func:`draw` makes one picture of it (needs matplotlib: ``pip install 'kvplan[plot]'``).

The KV bytes are the runtime's own theoretical bytes (:func:`runtime.cache.theoretical_bytes`, what ``generate`` and
``eval`` report as theoretical), computed for a config rebuilt from the plan's fingerprint; the part KCache moves to
its value store (:func:`runtime.cache.theoretical_store_bytes`) is counted apart: moved off the model's device, not
removed.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from . import registry
from .cache import (
    stock_bytes, stock_full_attention_bytes, theoretical_bytes, theoretical_full_attention_bytes, theoretical_layers,
    theoretical_store_bytes,
)
from .kvcompress import head_fractions
from .plan import Plan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MATPLOTLIB_HINT = "drawing the plan needs matplotlib: pip install matplotlib (or pip install 'kvplan[plot]')"
_LIST_HEADS = 4  # up to this many KV heads, the table lists every head's share (else min/mean/max)
_KINDS = {"full_attention": "full", "sliding_attention": "sliding"}

__all__ = ["DTYPES", "MATPLOTLIB_HINT", "describe", "draw", "render_text"]


def _config(fingerprint: dict[str, Any]) -> SimpleNamespace:
    """The parts of a model config the runtime's byte counts read, from the plan's fingerprint."""
    return SimpleNamespace(**{key: fingerprint[key] for key in (
        "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size", "layer_types",
        "sliding_window",
    )})


def _plan_dtype(plan: Plan) -> tuple[str, str]:
    """(dtype name, where it comes from): the weights digest, else the calibration's dtype, else float32."""
    weights = plan.fingerprint.get("weights")
    candidates = (
        (weights.split(":")[0] if isinstance(weights, str) else None, "the weights digest"),
        (plan.provenance.get("dtype"), "the calibration's provenance"),
        (plan.recipe.get("dtype"), "the recipe"),
    )
    for name, source in candidates:
        if name in DTYPES:
            return name, source
    return "float32", "assumed: the plan records no dtype"


def describe(plan: Plan, context: int = 2048, batch: int = 1, dtype: str | None = None) -> dict[str, Any]:
    """Everything ``inspect`` shows, as a JSON-ready dict; the KV bytes for ``context`` tokens seen per row,
    ``batch`` rows and K/V in ``dtype`` (default: the plan's, see :func:`_plan_dtype`)."""
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be positive, got context={context}, batch={batch}")
    if dtype is None:
        dtype, dtype_source = _plan_dtype(plan)
    elif dtype in DTYPES:
        dtype_source = "given"
    else:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    fp = plan.fingerprint
    config = _config(fp)
    torch_dtype = DTYPES[dtype]
    layers = theoretical_layers(plan, config, context)
    keep = plan.layer_keep
    shares = plan.head_keep
    layer_rows = []
    for spec, held in layers:
        fractions = head_fractions(plan, spec.index) if shares is not None else None
        if fractions is not None:
            kept = sum(fractions) / len(fractions)
        else:
            kept = float(keep[spec.index]) if keep is not None else 1.0
        layer_rows.append({
            "layer": spec.index,
            "kind": _KINDS.get(spec.kind, spec.kind),
            "kept_fraction": round(kept, 6),
            "tokens": round(float(held), 3),
            "source": int(plan.share_source[spec.index]) if plan.share_source is not None else None,
            "head_shares": [round(v, 6) for v in shares[spec.index].tolist()] if shares is not None else None,
            "head_fractions": [round(v, 6) for v in fractions] if fractions is not None else None,
            "topn": int(plan.topn[spec.index]) if plan.topn is not None else None,
            "value_store": spec.owns_cache and spec.topn > 0,
        })
    params = {method: dict(plan.params.get(method, {})) for method in plan.methods}
    defaults = {  # runtime parameters the plan leaves out: the runtime applies their defaults
        method: {p.name: p.default for p in registry.get(method).runtime_params() if p.name not in params[method]}
        for method in plan.methods
    }
    stock = stock_bytes(config, context, batch, torch_dtype)
    total = theoretical_bytes(plan, config, context, batch, torch_dtype)
    store = theoretical_store_bytes(plan, config, context, batch, torch_dtype)
    sliding = any(spec.kind != "full_attention" for spec, _ in layers)
    full_attention = {  # a model with sliding-window layers: the part a plan compresses, apart
        "full_attention_stock": stock_full_attention_bytes(config, context, batch, torch_dtype),
        "full_attention_theoretical": theoretical_full_attention_bytes(plan, config, context, batch, torch_dtype),
    } if sliding else {}
    return {
        "model": {
            "name_or_path": fp["name_or_path"],
            "model_type": fp["model_type"],
            "revision": fp["revision"],
            "weights": fp.get("weights"),
            "layers": fp["num_hidden_layers"],
            "attention_heads": fp["num_attention_heads"],
            "kv_heads": fp["num_key_value_heads"],
            "head_dim": fp["head_dim"],
            "sliding_window": fp["sliding_window"],
            "dtype": dtype,
            "dtype_source": dtype_source,
        },
        "methods": list(plan.methods),
        "target_ratio": plan.target_ratio,
        "params": params,
        "param_defaults": defaults,
        "layers": layer_rows,
        "sharing": [
            {"layer": row["layer"], "reads": row["source"]}
            for row in layer_rows if row["source"] is not None and row["source"] != row["layer"]
        ],
        "kv_bytes": {
            "context": context,
            "batch": batch,
            "dtype": dtype,
            "stock": stock,
            "theoretical": total,
            "with_model": total - store,
            "value_store": store,
            **full_attention,
        },
        "kvplan_version": plan.kvplan_version,
        "provenance": plan.provenance,
    }


# ----------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------


def _mib(count: int) -> str:
    return f"{count / 2**20:.2f} MiB"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def _shares_cell(row: dict[str, Any]) -> str:
    """Each head's share (``*``: keeps the whole context) when few heads, else min/mean/max and the whole ones."""
    shares, fractions = row["head_shares"], row["head_fractions"]
    whole = [f >= 1.0 for f in fractions]
    if len(shares) <= _LIST_HEADS:
        return " ".join(f"{s:.3f}{'*' if w else ' '}" for s, w in zip(shares, whole))
    cell = f"{min(shares):.3f}/{sum(shares) / len(shares):.3f}/{max(shares):.3f}"
    return cell + (f" ({sum(whole)}*)" if any(whole) else "")


def _layer_table(d: dict[str, Any]) -> list[str]:
    methods = d["methods"]
    rows = d["layers"]
    columns: list[tuple[str, Any]] = [
        ("layer", lambda r: str(r["layer"])),
        ("kind", lambda r: r["kind"]),
        ("kept", lambda r: f"{r['kept_fraction']:.3f}"),
        (f"tokens@{d['kv_bytes']['context']}", lambda r: _number(r["tokens"])),
    ]
    if "kvsharer" in methods:
        columns.append(("reads", lambda r: "-" if r["source"] == r["layer"] else str(r["source"])))
    if "kvcompress" in methods:
        title = "head shares" if d["model"]["kv_heads"] <= _LIST_HEADS else "head shares min/mean/max"
        columns.append((title, _shares_cell))
    if "kcache" in methods:
        columns.append(("top-N", lambda r: "all" if r["topn"] == 0 else str(r["topn"])))
        columns.append(("values", lambda r: "store" if r["value_store"] else "model"))
    cells = [[fmt(r) for _, fmt in columns] for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (title, _) in enumerate(columns)]
    lines = ["  ".join(title.rjust(w) for (title, _), w in zip(columns, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
    return lines


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return f"{{{len(value)} keys: {', '.join(list(value)[:6])}{', ...' if len(value) > 6 else ''}}} (in --json)"
    if isinstance(value, list):
        return f"[{len(value)} entries] (in --json)"
    return str(value)


def render_text(d: dict[str, Any]) -> str:
    """The plain-text report of a :func:`describe` dict."""
    m, kv = d["model"], d["kv_bytes"]
    lines = []
    if d.get("source"):
        lines.append(f"plan: {d['source']}")
    name = m["name_or_path"] or "<unnamed>"
    lines.append(f"model: {name}" + (f"@{m['revision']}" if m["revision"] else "") + f" ({m['model_type']})")
    shape = (f"  {m['layers']} layers, {m['attention_heads']} attention heads, {m['kv_heads']} KV heads, "
             f"head_dim {m['head_dim']}")
    if m["sliding_window"]:
        shape += f", sliding window {m['sliding_window']}"
    lines.append(shape)
    if m["weights"]:
        lines.append(f"  weights digest: {m['weights']}")
    lines.append(f"  KV dtype: {m['dtype']} ({m['dtype_source']})")
    lines.append("methods: " + (", ".join(d["methods"]) or "none (the plan changes nothing)"))
    for method in d["methods"]:
        given = ", ".join(f"{k}={v}" for k, v in sorted(d["params"][method].items()))
        unset = ", ".join(f"{k}={'unset' if v is None else v}"
                          for k, v in sorted(d["param_defaults"][method].items()))
        parts = [given] if given else []
        parts += [f"defaults {unset}"] if unset else []
        lines.append(f"  {method}: {'; '.join(parts) or 'no runtime parameters'}")
    if d["target_ratio"] is not None:
        lines.append(f"target ratio: {float(d['target_ratio']):.3g} of the full KV memory")

    lines += ["", "per layer:", *_layer_table(d)]
    notes = ["kept: fraction of the context the layer keeps",
             f"tokens@{kv['context']}: tokens it holds per row and KV head (0: it reads another layer's cache)"]
    if "kvcompress" in d["methods"]:
        notes.append("head shares: each KV head's share of the layer's budget (*: keeps the whole context)")
    if "kcache" in d["methods"]:
        notes.append("top-N: value rows a decode step reads per KV head (all: every row); values: where they live")
    lines += [f"  {note}" for note in notes]

    lines += ["", "sharing (KVSharer):"]
    if "kvsharer" not in d["methods"]:
        lines.append("  not in this plan")
    elif not d["sharing"]:
        lines.append("  no layer shares: every layer owns its cache")
    else:
        lines += [f"  layer {arc['layer']} reads layer {arc['reads']}" for arc in d["sharing"]]

    stock = kv["stock"]
    lines += ["", f"KV bytes at context {kv['context']}, batch {kv['batch']}, {kv['dtype']} (theoretical: K/V only, "
              "no bookkeeping):"]
    table = [("stock (full cache)", stock, "")]
    if "kcache" in d["methods"]:
        table += [
            ("plan, with the model", kv["with_model"], f"{kv['with_model'] / stock:.3f} of stock"),
            ("plan, in the value store", kv["value_store"], "KCache's values: moved off the model's device, not "
             "removed"),
        ]
    table.append(("plan, total" if "kcache" in d["methods"] else "plan (all with the model)", kv["theoretical"],
                  f"{kv['theoretical'] / stock:.3f} of stock"))
    if "full_attention_stock" in kv:
        full_stock, full_plan = kv["full_attention_stock"], kv["full_attention_theoretical"]
        table += [
            ("full-attention layers, stock", full_stock, "(the sliding-window layers hold their window in any case)"),
            ("full-attention layers, plan", full_plan, f"{full_plan / full_stock:.3f} of their stock"),
        ]
    width = max(len(label) for label, _, _ in table)
    for label, count, note in table:
        lines.append(f"  {label.ljust(width)}  {_mib(count):>12}  {count:>13,d} B" + (f"   {note}" if note else ""))

    lines += ["", f"provenance (kvplan {d['kvplan_version']}):"]
    lines += [f"  {key}: {_short(value)}" for key, value in d["provenance"].items()] or ["  (none recorded)"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Picture
# ----------------------------------------------------------------------------------------------------------


def _absent(ax, title: str, text: str = "not in this plan") -> None:
    ax.set_title(title, fontsize=10)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="0.4")
    ax.set_xticks([])


def draw(plan_or_description: Plan | dict[str, Any], path: str | Path) -> Path:
    """One PNG of the plan: kept fraction per layer as a pyramid, KVSharer's sharing as arcs, KV-Compress's
    per-head shares as a heatmap, KCache's top-N per layer as bars (a panel whose method the plan lacks says so).
    A :class:`Plan` is described at context 2048, batch 1."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError(MATPLOTLIB_HINT) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Arc, Patch

    d = describe(plan_or_description) if isinstance(plan_or_description, Plan) else plan_or_description
    rows, methods, kv = d["layers"], d["methods"], d["kv_bytes"]
    n = len(rows)
    index = list(range(n))
    fig, axes = plt.subplots(1, 4, figsize=(16, max(4.5, 0.22 * n + 2.2)), sharey=True,
                             gridspec_kw={"width_ratios": [1.3, 0.8, 1.0, 1.0]})
    keep_ax, share_ax, head_ax, topn_ax = axes

    # kept fraction: one centred bar per layer (a pyramid when lower layers keep more)
    colours = {"full": "tab:blue", "sliding": "tab:orange", "reads": "0.8"}
    kinds = ["reads" if r["source"] is not None and r["source"] != r["layer"] else r["kind"] for r in rows]
    widths = [r["kept_fraction"] for r in rows]
    keep_ax.barh(index, widths, left=[-w / 2 for w in widths], color=[colours.get(k, "tab:gray") for k in kinds],
                 height=0.8)
    for i, (w, k) in enumerate(zip(widths, kinds)):
        label = f"reads {rows[i]['source']}" if k == "reads" else f"{w:.2f}"
        keep_ax.text(w / 2 + 0.02, i, label, va="center", fontsize=7)
    keep_ax.set_xlim(-0.6, 0.75)
    keep_ax.set_xticks([-0.5, -0.25, 0, 0.25, 0.5], ["1", "0.5", "0", "0.5", "1"])
    keep_ax.set_xlabel("kept fraction of the context (bar width)")
    keep_ax.set_ylabel("layer")
    keep_ax.set_title("kept fraction per layer", fontsize=10)
    present = [k for k in colours if k in kinds] + sorted({k for k in kinds if k not in colours})
    names = {"full": "full attention", "sliding": "sliding window", "reads": "reads another layer's cache"}
    keep_ax.legend(handles=[Patch(color=colours.get(k, "tab:gray"), label=names.get(k, k)) for k in present],
                   loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=len(present), fontsize=7, frameon=False)

    # KVSharer: an arc from each source to each layer that reads it
    title = "KVSharer: layer j reads layer i"
    if "kvsharer" not in methods:
        _absent(share_ax, title)
    elif not d["sharing"]:
        _absent(share_ax, title, "no layer shares")
    else:
        span = max(arc["layer"] - arc["reads"] for arc in d["sharing"])
        for arc in d["sharing"]:
            i, j = arc["reads"], arc["layer"]
            share_ax.add_patch(Arc((0, (i + j) / 2), (j - i) / span * 1.8, j - i, theta1=-90, theta2=90,
                                   color="tab:purple", lw=1.5))
            share_ax.plot([0, 0], [i, j], "o", color="tab:purple", ms=3)
            share_ax.text(-0.05, j, f"{j}←{i}", ha="right", va="center", fontsize=7)
        share_ax.set_xlim(-0.5, 1.05)
        share_ax.set_xticks([])
        share_ax.set_title(title, fontsize=10)

    # KV-Compress: each KV head's share of its layer's budget
    title = "KV-Compress: head share of the layer budget"
    if "kvcompress" not in methods:
        _absent(head_ax, title)
    else:
        shares = [r["head_shares"] for r in rows]
        heads = len(shares[0])
        image = head_ax.imshow(shares, aspect="auto", origin="lower", cmap="viridis", vmin=0.0,
                               interpolation="nearest", extent=(-0.5, heads - 0.5, -0.5, n - 0.5))
        whole = [(h, r["layer"]) for r in rows for h, f in enumerate(r["head_fractions"]) if f >= 1.0]
        if whole:
            head_ax.scatter(*zip(*whole), s=14, c="white", edgecolors="black", linewidths=0.5)
            title += "\n(white dot: keeps the whole context)"
        head_ax.set_xticks(range(heads))
        head_ax.set_xlabel("KV head")
        head_ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=head_ax, fraction=0.08, pad=0.02, label="share (row sums to 1)")

    # KCache: values each decode step reads
    title = "KCache: top-N value rows per decode step"
    if "kcache" not in methods:
        _absent(topn_ax, title)
    else:
        topn = [r["topn"] for r in rows]
        topn_ax.barh(index, topn, color=["tab:green" if r["value_store"] else "0.8" for r in rows], height=0.8)
        top = max(topn) or 1
        for i, value in enumerate(topn):
            topn_ax.text(value + top * 0.02, i, "all (values with the model)" if value == 0 else str(value),
                         va="center", fontsize=7)
        topn_ax.set_xlim(0, top * 1.45)
        topn_ax.set_xlabel("N (rows read per KV head)")
        topn_ax.set_title(title, fontsize=10)

    keep_ax.set_ylim(-0.6, n - 0.4)
    keep_ax.set_yticks(index if n <= 40 else index[:: max(1, n // 20)])
    stock = kv["stock"]
    model = d["model"]["name_or_path"] or d["model"]["model_type"]
    ratio = f", target ratio {d['target_ratio']:.3g}" if d["target_ratio"] is not None else ""
    store = f" (in KCache's value store: {kv['value_store'] / stock:.3f})" if "kcache" in methods else ""
    fig.suptitle(
        f"{model}: {', '.join(methods) or 'no method'}{ratio}\n"
        f"theoretical KV at {kv['context']} tokens × {kv['batch']}: {kv['theoretical'] / stock:.3f} of stock{store}",
        fontsize=11,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
