"""Build the evaluation text folders used by the KV-Compress report (nothing is downloaded).

    python bench/eval_texts.py --out .scratch/eval

- ``essays_a/``: the first 19 of the 39 Paul Graham essays in ``../shared/data`` (sorted by file name) — the
  **tuning** half (settings such as the probe weight and the pooling width were chosen on it);
- ``essays_b/``: the other 20 — the **reporting** half (figures in the README come from it);
- ``code/``: 19 modules of the running Python's standard library, as ``.txt`` (code text of another kind);
- encyclopedic text is read directly from ``../shared/data/leval/Open-ended-tasks/natural_question.jsonl``
  (Wikipedia pages; ``runtime eval --data`` takes the .jsonl).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ESSAYS = REPO_ROOT.parent / "shared" / "data" / "paul_graham_essays"
CODE_MODULES = (
    "json/decoder.py", "json/encoder.py", "email/feedparser.py", "email/message.py", "http/client.py",
    "http/cookiejar.py", "argparse.py", "configparser.py", "csv.py", "difflib.py", "dataclasses.py", "inspect.py",
    "logging/__init__.py", "pathlib.py", "shutil.py", "statistics.py", "tarfile.py", "textwrap.py", "zipfile.py",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / ".scratch" / "eval", help="where to write the folders")
    p.add_argument("--essays", type=Path, default=ESSAYS, help="folder of the essays (.txt)")
    args = p.parse_args(argv)
    essays = sorted(args.essays.glob("*.txt"))
    if len(essays) < 2:
        p.error(f"no essays in {args.essays}")
    half = len(essays) // 2
    for name, files in (("essays_a", essays[:half]), ("essays_b", essays[half:])):
        folder = args.out / name
        folder.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy(f, folder / f.name)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = args.out / "code"
    code.mkdir(parents=True, exist_ok=True)
    for module in CODE_MODULES:
        shutil.copy(stdlib / module, code / (module.replace("/", "_").removesuffix(".py") + ".txt"))
    print(f"wrote {args.out}: essays_a {half} files (tuning), essays_b {len(essays) - half} (reporting), "
          f"code {len(CODE_MODULES)} modules", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
