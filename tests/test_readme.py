"""The README's Python examples run as written, and produce what their comments say."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_the_two_setup_commands() -> None:
    head = README.read_text(encoding="utf-8")[:1200]
    assert "make demo" in head and "make test" in head


def test_readme_examples_run_and_match_their_comments() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 2
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out, weights, lse = namespace["out"], namespace["weights"], namespace["lse"]
    assert isinstance(out, torch.Tensor) and out.shape == (2, 8, 128, 64)
    assert isinstance(weights, torch.Tensor) and weights.shape == (2, 8, 128, 160)
    assert isinstance(lse, torch.Tensor) and lse.shape == (2, 8, 128)
    full, steps = namespace["full"], namespace["steps"]
    assert isinstance(full, torch.Tensor)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
