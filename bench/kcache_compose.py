"""Add a KCache plan's ``kcache.topn`` (and its estimator) to another plan of the same model, and save the result.

    python bench/kcache_compose.py artifacts/smollm2-135m-r0.25.safetensors \
        artifacts/smollm2-135m-kcache.safetensors --out artifacts/smollm2-135m-r0.25-kcache.safetensors

KCache's calibration reads nothing of the other methods but a KVSharer map, so for a base plan without KVSharer this
is what a joint ``--methods <base>,kcache`` calibration chooses (checked for PyramidInfer: identical ``topn``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import runtime  # noqa: E402
from bench.kcache_eval import compose  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="the plan to add KCache to")
    p.add_argument("kcache", type=Path, help="a plan with kcache.topn (python -m calibrate ... --methods kcache)")
    p.add_argument("--out", type=Path, required=True, help="where to write the composed plan")
    args = p.parse_args(argv)
    base, kc = runtime.load_plan(str(args.base)), runtime.load_plan(str(args.kcache))
    plan = compose(base, kc)
    recipe = {**base.recipe, "methods": list(plan.methods)}
    if "kcache" in kc.recipe:
        recipe["kcache"] = kc.recipe["kcache"]
    provenance = {**base.provenance, "composed_from": [str(args.base), str(args.kcache)],
                  "kcache_calibration": kc.provenance.get("kcache_calibration")}
    plan = dataclasses.replace(plan, recipe=recipe, provenance=provenance)
    plan.save(args.out)
    print(f"wrote {args.out}: {', '.join(plan.methods)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
