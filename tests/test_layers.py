"""The package's layers point one way: ``qkv.ops`` ← ``qkv.nn`` ← ``qkv.models`` ← ``qkv.train``, ``qkv.data``,
``qkv.viz`` (and the deploy, bench and integration packages beside them) ← ``qkv.cli``. A module may import its own
layer and those below it, never one above; ``qkv.checks`` and ``qkv.safe_files`` sit under every layer."""

from __future__ import annotations

import ast
from pathlib import Path

import qkv

BASE = 0  # imported by every layer, import no layer
RANKS = {
    "checks": BASE,
    "safe_files": BASE,
    "__init__": 1,  # the package re-exports the ops
    "ops": 1,
    "nn": 2,
    "models": 3,
    "data": 4,
    "train": 4,
    "viz": 4,
    "deploy": 4,
    "bench": 4,
    "integrations": 4,
    "cli": 5,
    "__main__": 5,
}
SOURCE = Path(qkv.__file__).parent


def layer(parts: tuple[str, ...]) -> str:
    return parts[0].removesuffix(".py")


def imported_layers(path: Path) -> set[str]:
    """The top-level ``qkv`` subpackages and modules ``path`` imports (at module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found |= {name.split(".")[1] for name in names if name.startswith("qkv.")}
    return found


def test_every_package_has_a_rank() -> None:
    tops = {layer(p.relative_to(SOURCE).parts) for p in SOURCE.rglob("*.py")}
    assert tops <= set(RANKS), f"give these a rank in RANKS: {sorted(tops - set(RANKS))}"


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for path in sorted(SOURCE.rglob("*.py")):
        own = layer(path.relative_to(SOURCE).parts)
        for other in imported_layers(path):
            if RANKS[other] > RANKS[own]:
                upward.append(f"{path.relative_to(SOURCE)} ({own}) imports qkv.{other}")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import torch\nfrom qkv.data.scenes import render\n\ndef f():\n    import qkv.cli.main\n")
    assert imported_layers(module) == {"data", "cli"}
