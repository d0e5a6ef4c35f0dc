"""``python -m calibrate ALIAS_OR_MODEL --out plan.safetensors``: calibrate a KV-cache plan for one model.

With ``--push-to-hub ORG/NAME`` the saved plan is then uploaded with its recipe and a model card.

Exit codes: 0 success, 1 calibration or upload failed (message on stderr; a plan that was written stays), 2 bad
command line or recipe.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from runtime import registry
from runtime.cli import HelpFormatter

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
METHOD_CHOICES = registry.METHODS
TIMING_KEYS = (
    "calibration_seconds", "forward_pass_seconds", "model_load_seconds", "kvsharer_search_seconds",
    "joint_search_seconds",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m calibrate",
        description=(
            "Calibrate a KV-cache compression plan for one model and write it as a .safetensors file. "
            "The model is a built-in alias (see --list-aliases), a Hugging Face repo id, a local model directory "
            "or a .gguf file; the recipe gives every setting, the options below override it."
        ),
        formatter_class=HelpFormatter,
        epilog=(
            "Options without a default here take the recipe's value: the alias's built-in recipe (the defaults of "
            "every built-in one: --methods pyramidinfer, --target-ratio 0.5, --seed 42, --dataset "
            "builtin:self-instruct), or for any other model 16 samples of 2048 tokens, float32 on cpu.\n"
            "Progress bars and log lines go to stderr (also into a log file); -q turns them off.\n\n"
            "example: python -m calibrate smollm2-135m --out plan.safetensors --methods pyramidinfer "
            "--target-ratio 0.5\n\n"
            "add --push-to-hub me/smollm2-135m-kvplan --hub-revision ratio-0.5 to upload the plan too, with a model "
            "card"
        ),
    )
    p.add_argument("model", nargs="?", help="alias (e.g. smollm2-135m), HF repo id, model directory or .gguf file")
    p.add_argument("--out", type=Path, help="where to write the plan (.safetensors)")
    p.add_argument("--recipe", help="recipe YAML file (default: the alias's built-in recipe, or defaults)")
    p.add_argument(
        "--methods",
        help="comma list of methods; 'all'; or 'none' (a plan that changes nothing). Methods: "
        + "; ".join(registry.help_lines()),
    )
    p.add_argument(
        "--target-ratio", type=float, help="fraction of the full KV cache memory to keep, in (0, 1] (default: the "
        "recipe's, 0.5)",
    )
    p.add_argument(
        "--share-layers",
        metavar="N",
        help="KVSharer: layers to share, a count (8) or a fraction of the layers (0.25), or 'auto' (default: alone "
        "a quarter of the layers; with pyramidinfer the split of --target-ratio between the methods is searched)",
    )
    p.add_argument(
        "--num-calibration-samples", type=int,
        help="number of calibration sequences (default: the recipe's; smollm2-135m 8, no recipe 16)",
    )
    p.add_argument(
        "--max-seq-length", type=int, help="tokens per calibration sequence (default: the recipe's; 2048 for "
        "smollm2-135m and without a recipe)",
    )
    p.add_argument(
        "--dataset", help="builtin:self-instruct, a .txt/.jsonl file, a folder of .txt, or an HF dataset (default: "
        "the recipe's, builtin:self-instruct)",
    )
    p.add_argument("--seed", type=int, help="random seed (same inputs + seed => same plan) (default: the recipe's, 42)")
    p.add_argument(
        "--device", help="cpu, cuda, cuda:N or auto (accelerate device_map) (default: the recipe's; cpu for "
        "smollm2-135m and without a recipe)",
    )
    p.add_argument(
        "--max-memory", metavar="SPEC",
        help="place the model with accelerate (implies --device auto) and cap what each device may hold: a comma list "
        "of DEVICE=SIZE, DEVICE a GPU index, cpu, mps or disk, SIZE bytes or e.g. 75GiB / 100GB / 512MiB. Layers that "
        "do not fit go to the next device in the order GPUs, cpu, disk (offloaded weights are loaded one layer at a "
        "time). e.g. 0=75GiB,cpu=100GiB (one 80 GB GPU), or cpu=2GiB (CPU only, the rest read from disk) (default: "
        "the recipe's max_memory: none, accelerate's own estimate)",
    )
    p.add_argument(
        "--offload-folder", metavar="DIR", type=Path,
        help="with --device auto / --max-memory: where accelerate may write weights offloaded to disk (safetensors "
        "checkpoints are read in place; weights converted while loading, e.g. to another dtype or from .bin, are "
        "written here), created if missing and kept (default: a temporary folder under $KVPLAN_CACHE/offload, "
        "removed when the calibration ends)",
    )
    p.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"),
        help="model dtype (default: the recipe's; float32 for smollm2-135m and without a recipe)",
    )
    p.add_argument(
        "--search-seconds", type=float, default=None, metavar="S",
        help="with several methods, the time the joint search may spend scoring whole candidate plans (owners' "
        "budgets, KCache's tolerance) on calibration continuations and retrieval probes; 0 = no joint search "
        "(default: 240)",
    )
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument(
        "--reproducible",
        action="store_true",
        help="leave wall-clock timings out of the plan so that reruns are byte-identical (also KVPLAN_REPRODUCIBLE=1)",
    )
    p.add_argument(
        "--push-to-hub", metavar="REPO",
        help="after writing --out, upload the plan, its recipe.yaml and a model card to this Hub model repo "
        "(org/name, created if missing; needs a token with write access: `hf auth login` or HF_TOKEN; HF_ENDPOINT "
        "picks another Hub). A failed upload keeps --out and exits 1",
    )
    p.add_argument(
        "--hub-revision", metavar="BRANCH",
        help="with --push-to-hub: the branch to push to, created from main if missing (default: main)",
    )
    p.add_argument(
        "--private", action="store_true",
        help="with --push-to-hub: create the repo private (an existing repo keeps its visibility)",
    )
    p.add_argument(
        "--license", metavar="ID",
        help="with --push-to-hub: the license the model card states, e.g. the base model's (apache-2.0, llama3, "
        "...) (default: none stated)",
    )
    p.add_argument("--list-aliases", action="store_true", help="print the built-in model aliases and exit")
    p.add_argument(
        "-q", "--quiet", action="store_true",
        help="no progress bars or log lines on stderr (on a terminal or not), only errors",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and the traceback of an error")
    return p


def parse_methods(text: str | None) -> list[str] | None:
    """``"a,b"`` → list; ``all`` → every method; ``none`` → []; ``None`` → use the recipe's."""
    if text is None:
        return None
    items = [t.strip().lower() for t in text.split(",") if t.strip()]
    if items == ["none"]:
        return []
    if items == ["all"]:
        return list(METHOD_CHOICES)
    if not items or "none" in items or "all" in items:
        raise ValueError("--methods takes a comma list of methods, or 'all', or 'none'")
    unknown = [m for m in items if m not in METHOD_CHOICES]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown} in --methods; choose from {', '.join(METHOD_CHOICES)}")
    return items


MAX_MEMORY_DEVICES = ("cpu", "mps", "disk")


def parse_max_memory(text: str | None) -> dict[str, str] | None:
    """``"0=75GiB,cpu=100GiB"`` → ``{"0": "75GiB", "cpu": "100GiB"}`` (a recipe's ``max_memory``); ``None`` → None.

    Raises:
        ValueError: not a comma list of ``DEVICE=SIZE`` with known devices (GPU index, ``cuda:N``, cpu, mps, disk),
            each once, and sizes accelerate understands.
    """
    if text is None:
        return None
    from runtime.models import memory_size

    example = "e.g. --max-memory 0=75GiB,cpu=100GiB"
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"--max-memory takes a comma list of DEVICE=SIZE, {example}")
    out: dict[str, str] = {}
    for item in items:
        device, sep, size = (part.strip() for part in item.partition("="))
        device = device.lower()
        if device.startswith("cuda:") and device[5:].isdigit():
            device = device[5:]
        if not sep or not device or not size:
            raise ValueError(f"--max-memory: {item!r} is not DEVICE=SIZE ({example})")
        if not (device.isdigit() or device in MAX_MEMORY_DEVICES):
            raise ValueError(f"--max-memory: unknown device {device!r}; use a GPU index (0, 1, ...), cpu, mps or disk")
        device = str(int(device)) if device.isdigit() else device
        if device in out:
            raise ValueError(f"--max-memory gives device {device!r} twice")
        try:
            memory_size(size)
        except ValueError as exc:
            raise ValueError(f"--max-memory {device}: {exc}") from None
        out[device] = size
    return out


def _placement(args) -> tuple[str | None, dict[str, str] | None]:
    """The --device and max_memory overrides: --max-memory implies --device auto (and refuses another device)."""
    max_memory = parse_max_memory(args.max_memory)
    if max_memory is None:
        return args.device, None
    if args.device not in (None, "auto"):
        raise ValueError(
            f"--max-memory places the model with accelerate (--device auto); it cannot be combined with --device "
            f"{args.device} (leave --device out, or pass --device auto)"
        )
    return "auto", max_memory


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    import transformers

    transformers.logging.set_verbosity_error()
    if not verbose:  # huggingface_hub's retry warnings on a failing download would bury the one error line
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()
        for name in ("httpx", "httpx2", "httpcore", "httpcore2"):  # one INFO line per request of a --push-to-hub
            logging.getLogger(name).setLevel(logging.WARNING)
    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        transformers.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _setup_logging(args.quiet, args.verbose)
    log = logging.getLogger("calibrate")

    from runtime.models import ModelSourceError
    from runtime.plan import PlanError

    from .pipeline import CalibrationError, calibrate, check_methods
    from .recipe import RecipeError, builtin_aliases, resolve_recipe

    if args.list_aliases:
        for alias in builtin_aliases():
            print(alias)
        return EXIT_OK
    if not args.model or args.out is None:
        parser.print_usage(sys.stderr)
        print("error: a model and --out are required", file=sys.stderr)
        return EXIT_USAGE
    if args.search_seconds is not None and not 0 <= args.search_seconds < float("inf"):
        print(f"error: --search-seconds must be a number of seconds >= 0, not {args.search_seconds}", file=sys.stderr)
        return EXIT_USAGE
    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists; pass --force to overwrite it", file=sys.stderr)
        return EXIT_USAGE
    if not args.out.parent.exists():
        print(f"error: the folder of --out ({args.out.parent}) does not exist", file=sys.stderr)
        return EXIT_USAGE
    problem = _push_problem(args)
    if problem is not None:  # before calibrating: the upload would fail after all that work
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        methods = parse_methods(args.methods)
        method_args = None
        if args.share_layers is not None:
            from .kvsharer import parse_share_layers

            method_args = {"kvsharer": {"share_layers": parse_share_layers(args.share_layers)}}
        device, max_memory = _placement(args)
        recipe = resolve_recipe(args.model, args.recipe).with_overrides(
            method_args=method_args,
            methods=methods,
            target_ratio=args.target_ratio,
            num_calibration_samples=args.num_calibration_samples,
            max_seq_length=args.max_seq_length,
            dataset=args.dataset,
            seed=args.seed,
            device=device,
            max_memory=max_memory,
            dtype=args.dtype,
        )
        check_methods(list(recipe.methods))
        if args.offload_folder is not None and recipe.device != "auto":
            raise ValueError(
                f"--offload-folder only applies when accelerate places the model (--device auto or --max-memory); "
                f"the device here is {recipe.device}"
            )
        if args.offload_folder is not None and args.offload_folder.exists() and not args.offload_folder.is_dir():
            raise ValueError(f"--offload-folder {args.offload_folder} exists and is not a folder")
    except (ValueError, RecipeError, CalibrationError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE

    try:
        # progress bars on stderr whether or not it is a terminal (tqdm writes to a log file too); -q: none
        result = calibrate(
            recipe, progress=not args.quiet, search_seconds=args.search_seconds, offload_folder=args.offload_folder
        )
        plan = result.plan
        if args.reproducible or os.environ.get("KVPLAN_REPRODUCIBLE") == "1":
            for key in TIMING_KEYS:
                plan.provenance[key] = None
        plan.save(args.out)
    except (CalibrationError, PlanError, RecipeError, OSError, ValueError, ModelSourceError) as exc:
        log.debug("calibration failed", exc_info=True)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # an unexpected failure: say what it was, keep the traceback for --verbose
        log.debug("calibration failed", exc_info=True)
        print(f"error: calibration failed: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED

    summary = _summary_lines(plan, result)
    if not args.quiet:
        print(f"wrote {args.out} ({args.out.stat().st_size} bytes)", file=sys.stderr)
        for line in summary:
            print(line, file=sys.stderr)
    if args.push_to_hub:
        return _push(plan, args, summary)
    return EXIT_OK


def _push_problem(args) -> str | None:
    """Why ``--push-to-hub`` (and its options) cannot work, found before calibrating; None when it can."""
    if not args.push_to_hub:
        given = [flag for flag, value in (("--hub-revision", args.hub_revision), ("--private", args.private),
                                          ("--license", args.license)) if value]
        verb = "only applies" if len(given) == 1 else "only apply"
        return f"{', '.join(given)} {verb} with --push-to-hub REPO" if given else None
    from huggingface_hub import constants, get_token

    from runtime.hub import looks_like_repo_id

    if not looks_like_repo_id(args.push_to_hub):
        return f"--push-to-hub takes a Hub repo id like 'org/name', not {args.push_to_hub!r}"
    if constants.is_offline_mode():
        return "--push-to-hub needs the network, but HF_HUB_OFFLINE=1 is set: unset it, or push later"
    if get_token() is None:
        return "--push-to-hub needs a Hub token with write access: run `hf auth login` or set HF_TOKEN"
    return None


def _push(plan, args, summary: list[str]) -> int:
    """Upload the saved plan with its card (the calibration's own figures under "Measured"); one error line if not."""
    from huggingface_hub import constants

    from runtime.plan import PlanError

    repo = args.push_to_hub
    try:
        sha = plan.push_to_hub(
            repo, revision=args.hub_revision, private=True if args.private else None, license=args.license,
            results=_card_results(summary, repo),
        )
    except PlanError as exc:
        print(f"error: {_one_line(exc)} (the plan is saved in {args.out})", file=sys.stderr)
        return EXIT_FAILED
    if not args.quiet:
        print(f"pushed to {constants.ENDPOINT}/{repo} ({args.hub_revision or 'main'}) at commit {sha}; load it "
              f'with runtime.load_plan("{repo}", revision="{sha}")', file=sys.stderr)
    return EXIT_OK


def _card_results(summary: list[str], repo: str) -> str:
    """The "Measured" part of a pushed plan's card: what the calibration printed, and how to measure the rest."""
    return "\n".join([
        "What `python -m calibrate` printed at the end of the calibration (measured on the calibration data):",
        "",
        "```text",
        *summary,
        "```",
        "",
        f"Not measured for this card: fidelity on held-out text and KV-cache memory (`python -m runtime eval <model> "
        f"--plan {repo}`) and decode speed (`python -m runtime generate <model> --plan {repo}`).",
    ])


def _one_line(exc: BaseException) -> str:
    """An error message on one line (a hub or loader message can span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _summary_lines(plan, result) -> list[str]:
    """What the calibration found, one line each: methods, time, and every method's report (stderr, the card)."""
    lines: list[str] = []
    lines.append(f"methods: {', '.join(plan.methods) or 'none (a plan that changes nothing)'}")
    lines.append(f"calibration: {result.calibration_seconds:.1f} s (model load {result.load_seconds:.1f} s, excluded)")
    placed = plan.provenance.get("device_map")
    if placed:
        lines.append("placement (accelerate device_map, modules per device): "
                     + ", ".join(f"{device} {count}" for device, count in placed.items()))
    pyr = result.report.get("pyramidinfer")
    if pyr:
        from .pyramidinfer import full_attention_note

        keep = plan.tensors["pyramidinfer.layer_keep"].tolist()
        lines.append(
            f"pyramidinfer: target ratio {pyr['target_ratio']:.4f}, kept at {pyr['calibration_length']} tokens "
            f"{pyr['achieved_ratio_at_calibration_length']:.4f}{full_attention_note(pyr)}, mean captured "
            f"attention mass {pyr['mean_captured_mass']:.4f}"
        )
        lines.append("per-layer keep fractions: " + " ".join(f"{k:.3f}" for k in keep))
    kvs = result.report.get("kvsharer")
    if kvs and kvs.get("skipped"):
        lines.append(f"kvsharer: no layer shared: {kvs['skipped']}")
    elif kvs:
        pairs = ", ".join(f"{l}<-{s}" for l, s in enumerate(kvs["share_source"]) if s != l) or "none"
        final = kvs["final"]
        last = (
            f"last accepted candidate: cosine {final['cosine']:.4f}, top-1 {final['top1']:.3f}"
            if final else "no candidate passed the threshold"
        )
        lines.append(
            f"kvsharer: {len(kvs['shared_layers'])} layers shared ({pairs}); {kvs['trials']} candidates tried in "
            f"{kvs['search_seconds']:.1f} s; {last}"
        )
    kvc = result.report.get("kvcompress")
    if kvc:
        from .kvcompress import budget_table

        lines += budget_table(kvc)
    kc = result.report.get("kcache")
    if kc:
        from .kcache import topn_table

        lines += topn_table(kc)
    split = result.report.get("split")
    if split:
        lines.append("joint split (shared layers / owners' mean keep / KL / top-1):")
        for row in split:
            mark = "  <- chosen" if row["chosen"] else ""
            lines.append(
                f"  {row['shared_layers']:3d} / {row['mean_keep_of_owners']:.3f} / {row['kl']:.4f} / "
                f"{row['top1']:.3f}{mark}"
            )
    joint = result.report.get("joint")
    if joint:  # after the split: the joint search ran last, on the chosen sharing map
        from .joint import joint_table

        lines += joint_table(joint)
    return lines


if __name__ == "__main__":
    sys.exit(main())
