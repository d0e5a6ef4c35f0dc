"""The README's Python API example runs as written (on the real SmolLM2-135M-Instruct)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import requires_smollm2

README = Path(__file__).resolve().parents[1] / "README.md"


def python_api_example() -> str:
    """The first ```python block after the README heading "Python API"."""
    text = README.read_text(encoding="utf-8")
    heading = re.search(r"^#+ .*Python API.*$", text, flags=re.MULTILINE)
    assert heading, "README.md has no 'Python API' heading"
    block = re.search(r"^```python\n(.*?)^```", text[heading.end():], flags=re.MULTILINE | re.DOTALL)
    assert block, "no ```python block after the 'Python API' heading"
    return block.group(1)


def test_the_example_uses_the_documented_api():
    code = python_api_example()
    compile(code, "README.md", "exec")
    for name in ("load_model(resolve_model_spec(", "runtime.apply_plan(", "DynamicCache(config=model.config)",
                 "past_key_values=cache", "runtime.physical_bytes(cache)", "runtime.stock_bytes(",
                 "runtime.kept_lengths(cache)"):
        assert name in code, name


@requires_smollm2
@pytest.mark.smollm2
def test_the_example_runs(capsys):
    namespace = {"__name__": "__main__"}
    exec(compile(python_api_example(), "README.md (Python API example)", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "KV cache" in printed and "tokens held per layer" in printed
    held, kept, stock, seen = namespace["held"], namespace["kept"], namespace["stock"], namespace["seen"]
    assert kept <= held < 0.6 * stock  # half of every layer kept, plus a little bookkeeping
    lengths = namespace["runtime"].kept_lengths(namespace["cache"])
    assert len(lengths) == namespace["model"].config.num_hidden_layers
    assert all(0 < n < seen for n in lengths)
