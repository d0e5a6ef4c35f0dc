"""What the two command lines (``python -m calibrate``, ``python -m runtime``) share."""

from __future__ import annotations

import argparse
import textwrap


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with every option's default (except flags and options that have none); descriptions and epilogs
    keep their line breaks and their ``- `` bullets, each paragraph wrapped to the terminal."""

    def _get_help_string(self, action):
        if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        if isinstance(action.default, (list, tuple)):  # as it is typed: "0.1 0.5 0.9"
            return f"{action.help or ''} (default: {' '.join(map(str, action.default))})"
        return super()._get_help_string(action)

    def _fill_text(self, text, width, indent):
        paragraphs: list[list[str]] = []
        for line in text.splitlines():
            if not line.strip():
                paragraphs.append([])
            elif line.startswith("  ") and paragraphs and paragraphs[-1]:
                paragraphs[-1].append(line.strip())  # a bullet's continuation line
            else:
                paragraphs.append([line.strip()])
        out = []
        for words in paragraphs:
            joined = " ".join(words)
            hang = indent + "  " if joined.startswith("- ") else indent
            out.append(textwrap.fill(
                joined, width, initial_indent=indent, subsequent_indent=hang, break_on_hyphens=False,
                break_long_words=False,
            ) if joined else "")
        return "\n".join(out)


__all__ = ["HelpFormatter"]
