"""The Triton backend is only offered where the installed Triton can run its kernels (3.4 or newer).

The kernels read ``triton.knobs``, new in Triton 3.4, while ``torch>=2.4`` ships Triton 3.0 to 3.3: on
such a CUDA machine ``auto`` once picked ``triton`` and crashed with AttributeError. These tests need no
Triton and no GPU: the version is read from the package metadata, which they replace.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterator

import pytest
import torch

import qkv
from qkv.ops import triton_backend
from qkv.ops.dispatch import choose_backend
from qkv.ops.spec import build_spec


@pytest.fixture
def installed_triton(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    """Pretend that Triton of a given version is installed."""

    def install(version: str) -> None:
        monkeypatch.setattr(triton_backend, "_triton_installed", lambda: True)
        monkeypatch.setattr(importlib.metadata, "version", lambda name: version if name == "triton" else "0")
        triton_backend.triton_version_error.cache_clear()

    yield install
    triton_backend.triton_version_error.cache_clear()


@pytest.mark.parametrize("version", ["3.0.0", "3.3.1", "3.3.0+git1234"])
def test_old_triton_is_never_chosen(installed_triton: Callable[[str], None], version: str) -> None:
    installed_triton(version)
    q = k = v = torch.randn(1, 2, 64, 16)
    spec = build_spec(q, k, v, window=(4, 4))
    reason = triton_backend.triton_unsupported_reason(spec, torch.device("cuda"), torch.float16)
    assert reason is not None and version in reason and "3.4" in reason
    # On a CUDA device, auto consults the Triton rule; it must fall back without touching the GPU.
    choice = choose_backend(
        spec,
        "auto",
        return_weights=False,
        return_lse=False,
        generator=None,
        device=torch.device("cuda"),
        dtype=torch.float16,
    )
    assert choice.backend != "triton"
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call: Triton .* need Triton 3\.4 or newer"):
        qkv.attention(q, k, v, window=(4, 4), backend="triton")


@pytest.mark.parametrize("version", ["3.4.0", "3.9.0", "4.0.0"])
def test_new_enough_triton_passes_the_version_rule(installed_triton: Callable[[str], None], version: str) -> None:
    installed_triton(version)
    assert triton_backend.triton_version_error() is None
