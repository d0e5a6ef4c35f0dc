"""Logits of a model under each plan, to check that a refactor of the runtime changes nothing (bit for bit).

    python bench/plan_logits.py dump OUT_DIR PLAN [PLAN ...]      # run with the code under test
    python bench/plan_logits.py compare DIR_A DIR_B               # "identical" or the largest difference

``dump`` runs SmolLM2-135M (or ``--model``) on a left-padded batch of two essay windows (``--lengths``, default 700
and 560 tokens): a prefill of all but the last ``--steps`` tokens, then the rest fed one token per step (so
decode-time compaction runs), and saves the logits of every step ``[B, steps + 1, vocab]`` per plan as
``<plan stem>.pt``. Run it from two checkouts (e.g. ``git worktree add /tmp/base <commit>`` and ``cd`` there) with
the same plan files, then ``compare``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))  # the checkout this is run from, not an installed kvplan

import torch  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "paul_graham_essays"


def _load(model_ref: str):
    if (Path.cwd() / "runtime" / "models.py").exists():
        from runtime.models import load_model, resolve_model_spec

        spec = resolve_model_spec(model_ref)
    else:  # checkouts before issue 9 kept the loader in calibrate
        from calibrate.models import load_model
        from calibrate.recipe import resolve_recipe

        spec = resolve_recipe(model_ref)
    loaded = load_model(spec, progress=False)
    return loaded.model, loaded.tokenizer


def dump(args) -> None:
    import runtime
    from runtime.cache import cache_argument
    from transformers import DynamicCache

    model, tok = _load(args.model)
    files = sorted(Path(args.data).glob("*.txt"))[: len(args.lengths)]
    rows = [tok(f.read_text(encoding="utf-8"), add_special_tokens=False).input_ids[:n] for f, n in zip(files, args.lengths)]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    context = width - args.steps
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = cache_argument(model)
    for path in args.plans:
        plan = runtime.load_plan(path)
        cache = DynamicCache(config=model.config)
        logits = []
        with runtime.apply_plan(model, plan), torch.inference_mode():
            out = model(ids[:, :context], attention_mask=mask[:, :context], **{name: cache})
            logits.append(out.logits[:, -1])
            for t in range(context, width):
                out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], **{name: cache})
                logits.append(out.logits[:, -1])
        stacked = torch.stack(logits, 1)
        torch.save(stacked, out_dir / f"{Path(path).stem}.pt")
        print(f"{Path(path).stem}: logits {list(stacked.shape)}, kept per layer {runtime.kept_lengths(cache)}")


def compare(args) -> int:
    a_dir, b_dir = Path(args.dir_a), Path(args.dir_b)
    differ = 0
    for a_file in sorted(a_dir.glob("*.pt")):
        b_file = b_dir / a_file.name
        if not b_file.exists():
            print(f"{a_file.stem}: missing in {b_dir}")
            differ += 1
            continue
        a, b = torch.load(a_file), torch.load(b_file)
        if torch.equal(a, b):
            print(f"{a_file.stem}: identical ({list(a.shape)})")
        else:
            differ += 1
            print(f"{a_file.stem}: DIFFER, max |a - b| = {float((a - b).abs().max()):.3g}")
    return 1 if differ else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="save the logits of each plan", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("out_dir")
    d.add_argument("plans", nargs="+")
    d.add_argument("--model", default="smollm2-135m", help="alias, HF id, directory or .gguf")
    d.add_argument("--data", default=str(DEFAULT_DATA), help="folder of .txt files")
    d.add_argument("--lengths", type=int, nargs="+", default=[700, 560], help="tokens of each (left-padded) row")
    d.add_argument("--steps", type=int, default=24, help="tokens fed one by one after the prefill")
    c = sub.add_parser("compare", help="compare two dumps")
    c.add_argument("dir_a")
    c.add_argument("dir_b")
    args = p.parse_args(argv)
    if args.command == "dump":
        dump(args)
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
