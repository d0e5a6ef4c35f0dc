"""Files shipped inside the ``runtime`` package that both sides read: built-in recipes and the built-in prompts.

- ``runtime/recipes/<alias>.yaml``: the built-in calibration recipes (each file's stem is its alias). The runtime
  reads only their model keys (to load the model an alias names); ``calibrate.recipe`` reads them whole.
- ``runtime/data/``: the shipped Apache-2.0 self-instruct prompts (calibration default and the ``generate`` demo
  prompt), attributed in ``runtime/data/SOURCE.md``.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator
from typing import Any

RECIPE_SUFFIXES = (".yaml", ".yml")


def _package_dir(name: str) -> Any:
    return importlib.resources.files("runtime").joinpath(name)


def builtin_recipe_files() -> Iterator[tuple[str, Any]]:
    """(alias, resource) pairs of the shipped recipes."""
    root = _package_dir("recipes")
    if not root.is_dir():
        return
    for entry in root.iterdir():
        name = entry.name
        if entry.is_file() and name.endswith(RECIPE_SUFFIXES) and not name.startswith((".", "_")):
            yield name.rsplit(".", 1)[0], entry


def builtin_aliases() -> list[str]:
    """Sorted aliases of the built-in recipes."""
    return sorted({alias for alias, _ in builtin_recipe_files()})


def builtin_recipe(alias: str) -> Any:
    """The resource (a Path or Traversable) of the built-in recipe ``alias``, or None."""
    for name, entry in sorted(builtin_recipe_files(), key=lambda pair: pair[0]):
        if name == alias:
            return entry
    return None


def data_file(name: str) -> Any:
    """A file of the shipped data folder (``runtime/data/<name>``)."""
    return _package_dir("data").joinpath(name)


__all__ = ["builtin_recipe_files", "builtin_aliases", "builtin_recipe", "data_file"]
