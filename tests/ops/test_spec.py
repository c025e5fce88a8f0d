"""check_values_between: range checks read values on CPU only, so decoding on an accelerator never waits."""

from __future__ import annotations

import pytest
import torch

from qkv.ops import spec as spec_module
from qkv.ops.spec import build_spec, check_values_between


def test_values_on_cpu_are_read_and_named_in_the_error() -> None:
    check_values_between("key_lengths", torch.tensor([0, 7, 3]), 0, 7, "[0, S=7]")
    check_values_between("key_lengths", torch.tensor([], dtype=torch.long), 0, 7, "[0, S=7]")
    with pytest.raises(ValueError, match=r"^key_lengths must lie in \[0, S=7\]; got values from -2 to 5$"):
        check_values_between("key_lengths", torch.tensor([5, -2]), 0, 7, "[0, S=7]")
    with pytest.raises(ValueError, match=r"^indices must lie in \[0, B=3\); got values from 0 to 3$"):
        check_values_between("indices", torch.tensor([0, 3]), 0, 2, "[0, B=3)")


def test_values_off_cpu_are_checked_on_the_device_without_a_host_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A meta tensor has no values to read (``int()`` of one raises), as reading a CUDA one would synchronize;
    the check is queued with ``torch._assert_async`` instead."""
    asserted: list[tuple[torch.device, str]] = []
    real_assert = torch._assert_async

    def spy(condition: torch.Tensor, message: str) -> None:
        asserted.append((condition.device, message))
        real_assert(condition, message)

    monkeypatch.setattr(spec_module.torch, "_assert_async", spy)
    lengths = torch.tensor([5, 9]).to("meta")
    check_values_between("key_lengths", lengths, 0, 7, "[0, S=7]")
    assert asserted == [(torch.device("meta"), "key_lengths must lie in [0, S=7]")]


def test_build_spec_with_key_lengths_off_cpu_reads_no_value() -> None:
    q = torch.empty(3, 4, 1, 8, device="meta")
    kv = torch.empty(3, 2, 6, 8, device="meta")
    spec = build_spec(q, kv, kv, key_lengths=torch.tensor([6, 2, 4]).to("meta"), causal=True)
    assert spec.key_lengths is not None and spec.key_lengths.device.type == "meta"
