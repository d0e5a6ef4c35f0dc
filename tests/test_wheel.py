"""The wheel: every package and data file is in it, nothing else, and the CLIs run from it outside the checkout.

CI installs kvplan editable, which cannot see a file missing from the wheel; these tests build the wheel (offline,
from a copy of the checkout so no build/ folder lands in it), read its file list, install it into a fresh venv and run
``python -m calibrate`` / ``python -m runtime`` from a folder outside the checkout.
"""

from __future__ import annotations

import email.parser
import importlib.metadata
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("calibrate", "runtime")
NOT_SHIPPED = ("tests", "bench", "scripts", "artifacts", "docs", "build", "dist")
SKIP_DIRS = {".git", ".venv", ".venv-oldest", ".venv-kvpress", ".cache", ".pytest_cache", ".hypothesis", "build",
             "dist", "__pycache__"}
MIN_SETUPTOOLS = (77,)  # pyproject's build-system requires (PEP 639 license string)


def _source_files() -> list[Path]:
    """Files a clean clone would have plus uncommitted work: git's tracked and untracked-not-ignored files."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, check=True, timeout=60,
        ).stdout.decode().split("\0")
        return [Path(name) for name in listed if name and (REPO / name).is_file()]
    except (OSError, subprocess.SubprocessError):
        files = []
        for root, dirs, names in os.walk(REPO):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
            files += [Path(root, n).relative_to(REPO) for n in names if not n.endswith(".pyc")]
        return files


def _copy_checkout(dest: Path) -> Path:
    for rel in _source_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    return dest


def _setuptools_version() -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in importlib.metadata.version("setuptools").split(".")[:2] if p.isdigit())
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return _copy_checkout(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def wheel(source, tmp_path_factory) -> Path:
    found = _setuptools_version()
    if found is None or found < MIN_SETUPTOOLS:
        pytest.skip(
            f"cannot build the wheel offline: needs setuptools>={MIN_SETUPTOOLS[0]} in this environment "
            f"(found {found or 'none'}); `pip install 'setuptools>=77'` or run .ci/run's wheel stage"
        )
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", str(out)],
        capture_output=True, text=True, timeout=600, env=_clean_env(),
    )
    if done.returncode != 0 and "No module named pip" in done.stderr:
        pytest.skip("cannot build the wheel offline: pip is not installed in this environment")
    assert done.returncode == 0, f"pip wheel failed:\n{done.stdout}\n{done.stderr}"
    wheels = sorted(out.glob("kvplan-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def test_wheel_holds_every_package_and_data_file_and_nothing_else(wheel, source):
    names = set(zipfile.ZipFile(wheel).namelist())
    # every module and package of the source tree, whatever new ones are added
    expected = {
        rel.as_posix() for pkg in PACKAGES for rel in (p.relative_to(source) for p in (source / pkg).rglob("*.py"))
        if "__pycache__" not in rel.parts
    }
    assert {"runtime/evaluation/__init__.py", "calibrate/__main__.py", "runtime/__main__.py"} <= expected
    assert not expected - names, f"missing from the wheel: {sorted(expected - names)}"
    for pkg_dir in {p.parent for pkg in PACKAGES for p in (source / pkg).rglob("*.py")}:
        if "__pycache__" not in pkg_dir.parts:  # a folder without __init__.py would be left out (namespaces = false)
            assert (pkg_dir / "__init__.py").is_file(), f"{pkg_dir.relative_to(source)} has no __init__.py"
    # package data: the built-in recipes and the shipped prompts with their attribution
    recipes = {p.relative_to(source).as_posix() for p in (source / "runtime/recipes").glob("*.yaml")}
    assert "runtime/recipes/smollm2-135m.yaml" in recipes
    assert recipes <= names, f"recipes missing: {sorted(recipes - names)}"
    assert {"runtime/data/self_instruct.jsonl", "runtime/data/SOURCE.md"} <= names
    # nothing else at the top level: no tests, bench, scripts, artifacts
    dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
    tops = {n.split("/")[0] for n in names}
    assert tops == {*PACKAGES, dist_info}, f"unexpected top-level entries: {sorted(tops - {*PACKAGES, dist_info})}"
    assert not [n for n in names if n.split("/")[0] in NOT_SHIPPED or "__pycache__" in n or n.endswith(".pyc")]
    metadata = email.parser.Parser().parsestr(zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode())
    requires = [r.split(";")[0].replace(" ", "") for r in metadata.get_all("Requires-Dist") or []]
    assert any(r.startswith("packaging") for r in requires), requires
    assert "[console_scripts]" in zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()


@pytest.fixture(scope="module")
def wheel_venv(wheel, tmp_path_factory) -> Path:
    """A new venv with only the wheel installed (--no-deps); the dependencies come from this interpreter's
    site-packages, appended after the venv's own (a plain path .pth: the editable install's hook there never runs)."""
    venv = tmp_path_factory.mktemp("wheel-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True, timeout=300, capture_output=True)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, env=_clean_env(),
    ).stdout.strip())
    here = [p for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "zz_test_wheel_deps.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(here)))
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        capture_output=True, text=True, timeout=600, env=_clean_env(),
    )
    assert done.returncode == 0, f"installing the wheel failed:\n{done.stdout}\n{done.stderr}"
    return venv


def _run_outside(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "python"), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
        env=_clean_env(KVPLAN_CACHE=str(cwd / "kvplan-cache")),
    )


def test_installed_wheel_runs_the_clis_outside_the_checkout(wheel_venv, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert not outside.resolve().is_relative_to(REPO)
    done = _run_outside(wheel_venv, outside, "-m", "calibrate", "--help")
    assert done.returncode == 0, done.stderr
    assert "--target-ratio" in done.stdout and "--methods" in done.stdout
    done = _run_outside(wheel_venv, outside, "-m", "runtime", "eval", "--help")
    assert done.returncode == 0, done.stderr
    assert "--plan" in done.stdout and "--tasks" in done.stdout
    done = _run_outside(wheel_venv, outside, "-m", "calibrate", "--list-aliases")
    assert done.returncode == 0, done.stderr
    assert "smollm2-135m" in done.stdout.split()
    probe = (
        "import calibrate, calibrate.kvsharer, runtime, runtime.evaluation, runtime.resources as r\n"
        "print(calibrate.__file__); print(runtime.__file__); print(runtime.evaluation.__file__)\n"
        "print(r.data_file('self_instruct.jsonl')); assert r.data_file('self_instruct.jsonl').is_file()\n"
        "assert r.data_file('SOURCE.md').is_file() and 'smollm2-135m' in r.builtin_aliases()\n"
    )
    done = _run_outside(wheel_venv, outside, "-c", probe)
    assert done.returncode == 0, done.stderr
    site_packages = Path(subprocess.run(
        [str(wheel_venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()).resolve()
    for line in done.stdout.split():
        path = Path(line).resolve()
        assert path.is_relative_to(site_packages), f"{path} is not from the wheel's venv ({site_packages})"
        assert not path.is_relative_to(REPO), f"{path} comes from the checkout"
