"""The ``triton`` backend: its kernels against the reference in Triton's CPU interpreter, and its checks.

Triton decides between GPU and interpreter when it decorates a kernel, so the kernels run in a child
process started with ``TRITON_INTERPRET=1``: this file run as a script (``python test_triton.py NAME…``)
computes every case with ``backend="triton"`` and ``backend="math"`` and prints the errors as JSON; the
tests read them. One child runs all cases, so Triton and the kernels are imported once. Shapes are small
(the interpreter runs each block operation in NumPy) but span several blocks of the interpreter's
configuration (32 or 16 rows by 16 or 32 keys), so every part of the block ranges runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

import qkv  # noqa: E402
from qkv.ops import dispatch, triton_backend  # noqa: E402
from qkv.ops.spec import build_spec  # noqa: E402

Builder = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]]


def _qkv(
    batch: tuple[int, ...] = (1,),
    heads: int = 2,
    kv_heads: int | None = None,
    q_len: int = 40,
    kv_len: int = 40,
    head_dim: int = 32,
    value_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(q_len * 1000 + kv_len)
    kv_heads = heads if kv_heads is None else kv_heads
    value_dim = head_dim if value_dim is None else value_dim
    q = torch.randn(*batch, heads, q_len, head_dim, generator=g)
    k = torch.randn(*batch, kv_heads, kv_len, head_dim, generator=g)
    v = torch.randn(*batch, kv_heads, kv_len, value_dim, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _case(features: Callable[[], dict[str, Any]] | dict[str, Any] | None = None, **shape: Any) -> Builder:
    def build() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
        q, k, v = _qkv(**shape)
        kwargs = features() if callable(features) else dict(features or {})
        return q, k, v, kwargs

    return build


def _bool(*shape: int, p: float = 0.7, seed: int = 1) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


def _float(*shape: int, neg_inf: float = 0.1, seed: int = 2, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g)
    return values.masked_fill(torch.rand(shape, generator=g) < neg_inf, float("-inf")).to(dtype)


def _transposed() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    """q, k, v in a (B, L, H, D) memory layout, seen as (B, H, L, D): strides the kernels must follow."""
    q, k, v = _qkv(batch=(2,), heads=2, kv_heads=1, q_len=33, kv_len=45)
    return (*(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)), {"causal": True})


def _everything() -> dict[str, Any]:
    return {
        "causal": True,
        "window": (20, 0),
        "alibi_slopes": torch.tensor([0.5, 0.25]),
        "softcap": 3.0,
        "key_lengths": torch.tensor([45, 30]),
        "mask": _bool(2, 1, 1, 45, p=0.9),
    }


def _random(seed: int) -> Builder:
    """A random combination of shapes and rules (fixed by ``seed``): odd lengths against the blocks."""
    g = torch.Generator().manual_seed(seed)

    def pick(n: int) -> int:
        return int(torch.randint(0, n, (), generator=g))

    q_len, kv_len, kv_heads, groups = 1 + pick(70), 1 + pick(70), 1 + pick(2), 1 + pick(3)
    features: dict[str, Any] = {"causal": [False, True, "top_left"][pick(3)]}
    if pick(2):
        features["window"] = (pick(30) - 1, pick(30) - 1)
    if pick(2):
        features["key_lengths"] = torch.randint(0, kv_len + 1, (2,), generator=g)
    if pick(2):
        features["alibi_slopes"] = torch.rand(kv_heads * groups, generator=g)
    if pick(3) == 0:
        features["softcap"] = 1.0 + pick(5)
    if pick(3) == 0:
        features["mask"] = torch.rand(2, 1, q_len, kv_len, generator=g) < 0.8
    return _case(
        features,
        batch=(2,),
        heads=kv_heads * groups,
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        head_dim=16 * (1 + pick(2)),
    )


F16, BF16 = torch.float16, torch.bfloat16
CASES: dict[str, Builder] = {
    "plain": _case(),
    "padded_head_dims": _case(q_len=37, kv_len=29, head_dim=20, value_dim=12),
    "head_dim_128_dv_64": _case(q_len=24, kv_len=35, head_dim=128, value_dim=64),
    "single_query": _case({"causal": True}, q_len=1, kv_len=45),
    "causal_square": _case({"causal": True}, q_len=48, kv_len=48),
    "causal_bottom_right_L<S": _case({"causal": True}, q_len=24, kv_len=48),
    "causal_bottom_right_L>S": _case({"causal": True}, q_len=48, kv_len=20),
    "causal_top_left_L<S": _case({"causal": "top_left"}, q_len=24, kv_len=48),
    "causal_top_left_L>S": _case({"causal": "top_left"}, q_len=48, kv_len=20),
    "window": _case({"window": (8, 4)}, q_len=48, kv_len=48),
    "window_left_only_offset": _case({"window": (5, -1)}, q_len=20, kv_len=48),
    "window_right_only": _case({"window": (-1, 3)}, q_len=48, kv_len=30),
    "causal_window": _case({"causal": True, "window": (10, 0)}, q_len=48, kv_len=48),
    "causal_window_right_beyond_diag": _case({"causal": True, "window": (6, 9)}, q_len=30, kv_len=45),
    "alibi_per_head": _case(lambda: {"alibi_slopes": torch.tensor([0.5, 0.0625]), "causal": True}),
    "alibi_per_batch_head": _case(
        lambda: {"alibi_slopes": torch.tensor([[0.5, 0.25], [0.125, 1.0]])}, batch=(2,), kv_len=29
    ),
    "softcap": _case({"softcap": 2.0}),
    "softcap_barely_capping": _case({"softcap": 1e4}, q_len=24, kv_len=24),
    "softcap_causal_gqa": _case({"softcap": 1.5, "causal": True}, heads=4, kv_heads=2, q_len=33, kv_len=45),
    "gqa": _case(heads=4, kv_heads=2, q_len=35, kv_len=42),
    "mqa_causal": _case({"causal": True}, heads=3, kv_heads=1, q_len=40, kv_len=44),
    "key_lengths_with_zero": _case(lambda: {"key_lengths": torch.tensor([0, 17])}, batch=(2,)),
    "key_lengths_causal_gqa": _case(
        lambda: {"key_lengths": torch.tensor([45, 31]), "causal": True}, batch=(2,), heads=4, kv_heads=2, kv_len=45
    ),
    "bool_mask_padding_b11s": _case(lambda: {"mask": _bool(2, 1, 1, 40, p=0.8)}, batch=(2,)),
    "bool_mask_ls": _case(lambda: {"mask": _bool(40, 40)}),
    "bool_mask_h1_rows": _case(lambda: {"mask": _bool(2, 40, 1, p=0.5)}),
    "bool_mask_full_and_causal": _case(
        lambda: {"mask": _bool(2, 2, 24, 48), "causal": True}, batch=(2,), q_len=24, kv_len=48
    ),
    "float_mask_bhls_neg_inf": _case(lambda: {"mask": _float(2, 1, 40, 40)}, batch=(2,)),
    "float_mask_h1s": _case(lambda: {"mask": _float(2, 1, 40, neg_inf=0.0)}),
    "float_mask_alibi_window": _case(
        lambda: {"mask": _float(40, 40), "alibi_slopes": torch.tensor([0.25, 0.5]), "window": (6, 6)}
    ),
    "two_batch_dims_mask": _case(lambda: {"mask": _bool(2, 1, 1, 1, 40, p=0.8)}, batch=(2, 2), heads=1),
    "no_batch_dims": _case({"causal": True}, batch=()),
    "transposed_layout": _transposed,
    "everything": _case(_everything, batch=(2,), heads=2, kv_heads=1, q_len=33, kv_len=45),
    "empty_keys": _case(q_len=5, kv_len=0),
    **{f"random_{seed}": _random(seed) for seed in range(8)},
    "fp16_plain": _case(dtype=F16),
    "fp16_causal_L<S": _case({"causal": True}, q_len=24, kv_len=48, dtype=F16),
    "fp16_softcap_gqa": _case({"softcap": 2.0, "causal": True}, heads=4, kv_heads=2, dtype=F16),
    "fp16_alibi_window": _case(lambda: {"alibi_slopes": torch.tensor([0.5, 0.25]), "window": (9, 3)}, dtype=F16),
    "fp16_float32_mask": _case(lambda: {"mask": _float(1, 40, 40)}, dtype=F16),
}
# Only on a GPU: bfloat16 (Triton 3.9's interpreter multiplies bfloat16 bit patterns as integers in tl.dot,
# so it cannot check them) and shapes spanning the GPU configurations' 64- and 128-wide blocks.
GPU_CASES: dict[str, Builder] = {
    "bf16_causal_key_lengths": _case(
        lambda: {"causal": True, "key_lengths": torch.tensor([40, 9])}, batch=(2,), dtype=BF16
    ),
    "bf16_everything": _case(_everything, batch=(2,), heads=2, kv_heads=1, q_len=33, kv_len=45, dtype=BF16),
    "large_bf16_causal_gqa_d128": _case(
        {"causal": True}, batch=(2,), heads=8, kv_heads=2, q_len=1061, kv_len=1061, head_dim=128, dtype=BF16
    ),
    "large_fp16_window_alibi_d64": _case(
        lambda: {"window": (256, 0), "alibi_slopes": torch.rand(4)},
        heads=4,
        q_len=2048,
        kv_len=2048,
        head_dim=64,
        dtype=F16,
    ),
    "large_bf16_softcap_bottom_right_d128": _case(
        {"softcap": 30.0, "causal": True}, heads=4, q_len=500, kv_len=1536, head_dim=128, dtype=BF16
    ),
    "large_fp16_padding_mask_d256": _case(
        lambda: {"mask": _bool(2, 1, 1, 700, p=0.9)},
        batch=(2,),
        heads=2,
        q_len=700,
        kv_len=700,
        head_dim=256,
        dtype=F16,
    ),
    "large_fp32_key_lengths_d96": _case(
        lambda: {"key_lengths": torch.tensor([777, 300])}, batch=(2,), heads=2, q_len=777, kv_len=777, head_dim=96
    ),
}
# With return_weights (recomputed from the kernel's lse) on top.
WEIGHT_CASES = {"causal_bottom_right_L<S", "everything", "key_lengths_with_zero"}
# Run twice and compared bit for bit.
DETERMINISM_CASES = {"everything", "fp16_softcap_gqa", "large_bf16_causal_gqa_d128"}
# (atol, rtol): rtol is relative to the largest reference value of each output.
TOLERANCE = {"torch.float32": (1e-4, 1e-4), "torch.float16": (2e-2, 2e-2), "torch.bfloat16": (5e-2, 5e-2)}


def _error(got: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Max abs error over entries where the reference is finite, and whether the infinities agree."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(ref)
    same_inf = bool(torch.equal(torch.isinf(got), torch.isinf(ref)) and torch.equal(got[~finite], ref[~finite]))
    diff = (got[finite] - ref[finite]).abs()
    err = float(diff.max()) if diff.numel() else 0.0
    if torch.isnan(got).any():
        err = float("nan")
    scale = float(ref[finite].abs().max()) if finite.any() else 0.0
    return {"err": err, "scale": scale, "same_inf": same_inf}


def _run(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kwargs: dict[str, Any], backend: str, weights: bool
) -> dict[str, torch.Tensor]:
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    result = qkv.attention(q, k, v, **kwargs, return_lse=True, return_weights=weights, backend=backend)
    out, lse = result[0], result[-1]
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    if out.requires_grad:
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), d_out)
    else:  # no key at all: math returns constant zeros
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    values = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
    if weights:
        values["weights"] = result[1]
    return values


def compute_case(name: str, device: str = "cpu") -> dict[str, Any]:
    """Errors of ``backend="triton"`` against ``backend="math"`` on one case, with a few properties."""
    q, k, v, kwargs = {**CASES, **GPU_CASES}[name]()
    q, k, v = (t.to(device) for t in (q, k, v))
    kwargs = {key: x.to(device) if isinstance(x, torch.Tensor) else x for key, x in kwargs.items()}
    weights = name in WEIGHT_CASES
    got = _run(q, k, v, kwargs, "triton", weights)
    ref = _run(q, k, v, kwargs, "math", weights)
    result: dict[str, Any] = {"dtype": str(q.dtype), "errors": {key: _error(got[key], ref[key]) for key in ref}}
    empty = torch.isinf(got["lse"])
    result["masked_rows"] = int(empty.sum())
    result["masked_rows_zero"] = bool((got["out"][empty] == 0).all())
    result["grads_finite"] = all(bool(torch.isfinite(got[key]).all()) for key in ("dq", "dk", "dv"))
    if name in DETERMINISM_CASES:
        again = _run(q, k, v, kwargs, "triton", False)
        result["deterministic"] = all(torch.equal(got[key], again[key]) for key in ("out", "lse", "dq", "dk", "dv"))
    return result


def _worker(names: list[str]) -> None:
    from qkv.ops import triton_kernels

    report: dict[str, Any] = {
        "interpreted": triton_kernels.INTERPRETED,
        "configs": [
            len(c()) for c in (triton_kernels.forward_configs, triton_kernels.dq_configs, triton_kernels.dkdv_configs)
        ],
        "cases": {},
    }
    # The GPU lists' fallback configurations are kept only where the others may not fit.
    configs = [triton_kernels._config(128, 64, 8, 3), *triton_kernels._fallback()]
    half, single = torch.empty(1, dtype=torch.float16), torch.empty(1)
    report["pruned"] = [
        len(triton_kernels._prune(configs, {"Q": half}, BLOCK_D=128, BLOCK_DV=128)),
        len(triton_kernels._prune(configs, {"Q": half}, BLOCK_D=256, BLOCK_DV=128)),
        len(triton_kernels._prune(configs, {"Q": single}, BLOCK_D=64, BLOCK_DV=64)),
    ]
    for name in names:
        start = time.perf_counter()
        try:
            report["cases"][name] = compute_case(name)
            report["cases"][name]["seconds"] = round(time.perf_counter() - start, 2)
        except Exception:
            report["cases"][name] = {"exception": traceback.format_exc()}
    print(json.dumps(report))


def _check(case: dict[str, Any]) -> None:
    assert "exception" not in case, case.get("exception")
    atol, rtol = TOLERANCE[case["dtype"]]
    for key, e in case["errors"].items():
        assert e["same_inf"], f"{key}: infinities differ from the reference"
        assert e["err"] <= atol + rtol * e["scale"], f"{key}: max error {e['err']:.3g} (scale {e['scale']:.3g})"
    assert case["masked_rows_zero"], "rows with no allowed key must output zeros"
    assert case["grads_finite"]
    assert case.get("deterministic", True), "two runs must agree bit for bit"


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted() -> dict[str, Any]:
    """Run every case in one interpreter child process; its JSON report."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, *CASES], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_worker_ran_the_kernels_in_the_interpreter_with_one_config_each(interpreted: dict[str, Any]) -> None:
    assert interpreted["interpreted"] is True
    assert interpreted["configs"] == [1, 1, 1]
    assert interpreted["pruned"] == [1, 3, 3]


@pytest.mark.parametrize("name", CASES)
def test_triton_matches_the_reference(name: str, interpreted: dict[str, Any]) -> None:
    _check(interpreted["cases"][name])


ON_GPU = torch.cuda.is_available() and not triton_backend.interpreting()


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
@pytest.mark.parametrize("name", [*CASES, *GPU_CASES])
def test_triton_matches_the_reference_on_gpu(name: str) -> None:
    """Compiled kernels with the autotuned configurations of the GPU at hand."""
    _check(compute_case(name, "cuda"))


def test_cases_cover_fully_masked_rows(interpreted: dict[str, Any]) -> None:
    for name in ("causal_bottom_right_L>S", "key_lengths_with_zero", "bool_mask_h1_rows", "empty_keys"):
        assert interpreted["cases"][name]["masked_rows"] > 0, name


# The checks, in this process. On a GPU machine the GPU tests above may have built the kernels here; the
# checks under TRITON_INTERPRET=1 must then not see them (they would say the kernels were built for the GPU).


@pytest.fixture
def interpreter_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delitem(sys.modules, "qkv.ops.triton_kernels", raising=False)


def _spec(**kwargs: Any) -> Any:
    q, k, v = _qkv(batch=(1,), q_len=8, kv_len=8, head_dim=16)
    return build_spec(q, k, v, **kwargs)


def test_no_gpu_and_no_interpreter_gives_a_clear_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = triton_backend.triton_unsupported_reason(_spec(), torch.device("cpu"), torch.float32)
    assert reason is not None and "CUDA" in reason and "TRITON_INTERPRET=1" in reason


def test_explicit_triton_on_cpu_raises_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = _qkv(batch=(1,), q_len=8, kv_len=8, head_dim=16)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run this call: .*CUDA"):
        qkv.attention(q, k, v, causal=True, backend="triton")


@pytest.mark.usefixtures("interpreter_env")
def test_auto_never_picks_triton_on_cpu() -> None:
    q, k, v = _qkv(batch=(1,), q_len=64, kv_len=64, head_dim=16)
    assert qkv.explain_backend(q, k, v, softcap=2.0).backend != "triton"


def test_triton_missing_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_backend, "_triton_installed", lambda: False)
    reason = triton_backend.triton_unsupported_reason(_spec(), torch.device("cuda"), torch.float16)
    assert reason is not None and "qkv[gpu]" in reason


@pytest.mark.parametrize(
    ("dtype", "kwargs", "dims", "expected"),
    [
        (torch.float64, {}, {}, "float64"),
        (torch.float16, {"dropout": 0.1}, {}, "dropout"),
        (torch.float16, {}, {"head_dim": 320}, "head dims up to 256"),
        (torch.float32, {"mask": torch.zeros(8, 8, requires_grad=True)}, {}, "requires grad"),
        (torch.float32, {"alibi_slopes": torch.ones(2, requires_grad=True)}, {}, "requires grad"),
    ],
)
@pytest.mark.usefixtures("interpreter_env")  # so that the CPU device passes and the call is examined
def test_reasons_for_what_the_kernels_do_not_cover(
    dtype: torch.dtype, kwargs: dict[str, Any], dims: dict[str, int], expected: str
) -> None:
    q, k, v = _qkv(batch=(1,), q_len=8, kv_len=8, **{"head_dim": 16, **dims})
    spec = build_spec(q, k, v, **kwargs)
    reason = triton_backend.triton_unsupported_reason(spec, torch.device("cpu"), dtype)
    assert reason is not None and expected in reason
    assert triton_backend.triton_unsupported_reason(_spec(), torch.device("cpu"), torch.float32) is None


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, "torch"),
        ({"causal": "top_left"}, "torch"),
        ({"softcap": 2.0}, "triton"),
        ({"causal": True, "window": (4, 0)}, "triton"),
        ({"alibi_slopes": torch.ones(2)}, "triton"),
        ({"dropout": 0.1, "generator": torch.Generator()}, "tiled"),
    ],
)
@pytest.mark.usefixtures("interpreter_env")
def test_auto_on_cuda_prefers_triton_where_sdpa_needs_a_dense_mask(
    kwargs: dict[str, Any], expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The policy alone, on a pretend CUDA device (the availability check is replaced)."""
    real = triton_backend.triton_unsupported_reason

    def on_gpu(spec: Any, device: torch.device, dtype: torch.dtype) -> str | None:
        return real(spec, torch.device("cpu"), dtype)

    monkeypatch.setattr(dispatch, "triton_unsupported_reason", on_gpu)
    kwargs = dict(kwargs)
    generator = kwargs.pop("generator", None)
    q, k, v = _qkv(batch=(1,), q_len=64, kv_len=64, head_dim=16)
    spec = build_spec(q, k, v, **kwargs)
    choice = dispatch.choose_backend(
        spec,
        "auto",
        return_weights=False,
        return_lse=False,
        generator=generator,
        device=torch.device("cuda"),
        dtype=torch.float16,
    )
    assert choice.backend == expected, choice


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (and TRITON_INTERPRET unset)")
def test_auto_runs_triton_on_gpu_where_sdpa_needs_a_dense_mask() -> None:
    q, k, v = (t.cuda().half() for t in _qkv(q_len=256, kv_len=256, head_dim=64))
    assert qkv.explain_backend(q, k, v, softcap=20.0).backend == "triton"
    assert qkv.explain_backend(q, k, v, causal=True, window=(32, 0)).backend == "triton"
    assert qkv.explain_backend(q, k, v, causal=True).backend == "torch"


def test_importing_and_using_qkv_on_cpu_does_not_import_triton() -> None:
    code = (
        "import sys, torch, qkv; q = torch.randn(1, 2, 8, 16); "
        "qkv.attention(q, q, q, softcap=2.0); qkv.explain_backend(q, q, q, backend='math'); "
        "print('triton' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


if __name__ == "__main__":
    _worker(sys.argv[1:])
