"""qkv.viz.explain: the step-by-step numbers against an independent numpy computation, and their text."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import qkv.viz.explain as explain_module
from qkv.viz.explain import (
    EXAMPLE_K,
    EXAMPLE_Q,
    EXAMPLE_TOKENS,
    EXAMPLE_V,
    check_matrix,
    example,
    explain,
    fmt,
    render_text,
    to_json,
)


def reference(q, k, v, causal: bool = False) -> dict[str, np.ndarray]:
    """softmax(q·kᵀ/√d_k)·v in numpy, written independently of qkv; causal is bottom-right aligned."""
    q, k, v = (np.asarray(m, dtype=np.float64) for m in (q, k, v))
    length, keys = q.shape[0], k.shape[0]
    dots = q @ k.T
    scaled = dots / np.sqrt(q.shape[1])
    visible = np.tril(np.ones((length, keys), dtype=bool), k=keys - length) if causal else np.ones_like(dots, bool)
    weights = np.zeros_like(scaled)
    for i in range(length):
        seen = scaled[i][visible[i]]
        if seen.size:
            e = np.exp(seen - seen.max())
            weights[i][visible[i]] = e / e.sum()
    return {"dots": dots, "scaled": scaled, "visible": visible, "weights": weights, "outputs": weights @ v}


def assert_matches(expl, ref) -> None:
    np.testing.assert_allclose(np.array(expl.dots), ref["dots"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.array(expl.scaled), ref["scaled"], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.array(expl.visible), ref["visible"])
    np.testing.assert_allclose(np.array(expl.weights), ref["weights"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.array(expl.outputs), ref["outputs"], rtol=1e-12, atol=1e-12)


def random_qkv(length: int, keys: int, d_k: int, d_v: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(length, d_k)), rng.normal(size=(keys, d_k)), rng.normal(size=(keys, d_v))


# ---- numbers -------------------------------------------------------------------------------------------


def test_builtin_example_matches_numpy():
    expl = example()
    assert expl.query_tokens == list(EXAMPLE_TOKENS) == expl.key_tokens
    assert expl.d_k == 4 and expl.sqrt_d_k == 2.0
    assert_matches(expl, reference(EXAMPLE_Q, EXAMPLE_K, EXAMPLE_V))


def test_random_example_matches_numpy():
    q, k, v = random_qkv(5, 5, 3, 2, seed=0)
    assert_matches(explain(q, k, v), reference(q, k, v))


def test_causal_example_matches_numpy_and_masks_later_keys():
    q, k, v = random_qkv(4, 4, 3, 3, seed=1)
    expl = explain(q, k, v, causal=True)
    assert_matches(expl, reference(q, k, v, causal=True))
    weights = np.array(expl.weights)
    assert np.all(weights[np.triu_indices(4, k=1)] == 0)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0)


@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_matches_numpy(causal):
    q, k, v = random_qkv(2, 5, 3, 4, seed=2)
    expl = explain(q, k, v, causal=causal)
    assert_matches(expl, reference(q, k, v, causal=causal))
    assert expl.query_tokens == ["q1", "q2"]
    assert expl.key_tokens == ["k1", "k2", "k3", "k4", "k5"]
    if causal:  # bottom-right: the last query sees every key, the first all but the last
        assert expl.visible == [[True] * 4 + [False], [True] * 5]


def test_causal_cross_attention_with_fewer_keys_gives_zero_rows():
    q, k, v = random_qkv(4, 2, 3, 2, seed=3)
    expl = explain(q, k, v, causal=True)
    assert_matches(expl, reference(q, k, v, causal=True))
    assert expl.weights[0] == [0.0, 0.0] and expl.outputs[0] == [0.0, 0.0]
    assert expl.sums[0] == 0.0


def test_weights_and_outputs_are_qkv_attentions_own():
    q, k, v = random_qkv(3, 4, 2, 2, seed=4)
    expl = explain(q, k, v, causal=True)
    out, w = explain_module.attention(
        *(torch.tensor(m)[None] for m in (q, k, v)), causal=True, backend="math", return_weights=True
    )
    assert expl.weights == w[0].tolist() and expl.outputs == out[0].tolist()
    assert expl.max_difference <= 1e-12


def test_disagreement_with_qkv_attention_is_reported(monkeypatch):
    real = explain_module.attention

    def off_by_a_bit(*args, **kwargs):
        out, w = real(*args, **kwargs)
        return out + 1e-3, w

    monkeypatch.setattr(explain_module, "attention", off_by_a_bit)
    with pytest.raises(RuntimeError, match="differ from qkv.attention"):
        example()


def test_steps_are_consistent_exp_over_sum():
    q, k, v = random_qkv(3, 3, 4, 2, seed=5)
    expl = explain(q, k, v)
    exps, sums = np.array(expl.exps), np.array(expl.sums)
    np.testing.assert_allclose(exps, np.exp(reference(q, k, v)["scaled"]), rtol=1e-12)
    np.testing.assert_allclose(exps / sums[:, None], expl.weights, rtol=1e-12)


def test_large_scores_are_shifted_so_exp_stays_finite():
    q = [[40.0, 0.0], [0.0, -40.0]]
    k = [[40.0, 1.0], [-3.0, 40.0]]
    v = [[1.0], [2.0]]
    expl = explain(q, k, v)
    ref = reference(q, k, v)
    assert_matches(expl, ref)
    assert all(s != 0 for s in expl.shifts)
    np.testing.assert_allclose(expl.shifts, ref["scaled"].max(axis=1))
    assert np.isfinite(expl.exps).all()


def test_tokens_default_and_given():
    q, k, v = random_qkv(2, 2, 2, 2, seed=6)
    assert explain(q, k, v).query_tokens == ["t1", "t2"] == explain(q, k, v).key_tokens
    named = explain(q, k, v, tokens=["Acting", "Machines"])
    assert named.key_tokens == ["Acting", "Machines"]
    cross = explain(q, k[:1], v[:1], tokens=["a", "b"], key_tokens=["x"])
    assert (cross.query_tokens, cross.key_tokens) == (["a", "b"], ["x"])


def test_accepts_tensors():
    q, k, v = random_qkv(2, 3, 2, 2, seed=7)
    expl = explain(torch.tensor(q), torch.tensor(k, dtype=torch.float32), torch.tensor(v))
    assert_matches(expl, reference(q, torch.tensor(k, dtype=torch.float32).double().numpy(), v))


# ---- validation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([[1, 2], [3, 4, 5]], "Q: row 2 has 3 numbers but row 1 has 2"),
        ([[1, "x"]], "Q: row 1, column 2 is 'x', not a number"),
        ([[1, True]], "row 1, column 2 is true, not a number"),
        ([[1, None]], "row 1, column 2 is null, not a number"),
        ([[float("nan")]], "row 1, column 1 is nan, not a finite number"),
        ([[float("inf")]], "row 1, column 1 is inf, not a finite number"),
        ([[10**400]], "row 1, column 1 is too large"),
        ([], "Q is empty"),
        ([[]], "Q: row 1 is empty"),
        ([1, 2], "Q: row 1 is 1, not a list of numbers"),
        ("[[1]]", "expected a list of rows"),
        (3, "expected a list of rows"),
    ],
)
def test_check_matrix_names_the_problem(value, message):
    with pytest.raises(ValueError) as info:
        check_matrix(value, "Q")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_check_matrix_converts_to_floats():
    assert check_matrix([[1, 2.5]], "Q") == [[1.0, 2.5]]
    assert check_matrix(torch.tensor([[1, 2]]), "Q") == [[1.0, 2.0]]
    assert check_matrix(np.array([[0.5]]), "Q") == [[0.5]]


@pytest.mark.parametrize(
    ("q", "k", "v", "kwargs", "message"),
    [
        ([[1, 2]], [[1, 2, 3]], [[1]], {}, "d_k differs: Q has 2 columns but K has 3"),
        ([[1]], [[1], [2]], [[1]], {}, "K has 2 rows but V has 1"),
        ([[1], [2]], [[1], [2]], [[1], [2]], {"tokens": ["a"]}, "1 token given but Q has 2 rows"),
        ([[1]], [[1], [2]], [[1], [2]], {"key_tokens": ["a"]}, "1 key token given but K has 2 rows"),
        ([[1]], [[1]], [[1]], {"tokens": [3]}, "tokens must be a list of strings"),
        ([[1]], [[1, 2]], [[1]], {}, "d_k differs"),
        ([[1e200]], [[1e200]], [[1]], {}, "overflows"),
    ],
)
def test_explain_rejects_bad_inputs(q, k, v, kwargs, message):
    with pytest.raises(ValueError, match=message):
        explain(q, k, v, **kwargs)


# ---- text ------------------------------------------------------------------------------------------------


def test_fmt_has_four_decimals_and_no_negative_zero():
    assert fmt(0.123456) == "0.1235"
    assert fmt(-1e-9) == "0.0000"
    assert fmt(-2.5) == "-2.5000"


def test_render_text_shows_each_step_with_numpys_numbers():
    q, k, v = random_qkv(3, 3, 3, 2, seed=8)
    tokens = ["Acting", "Machines", "think"]
    ref = reference(q, k, v)
    text = render_text(explain(q, k, v, tokens=tokens))
    assert "softmax(Q·Kᵀ / √d_k)" in text and "√d_k = 1.7321" in text
    for token in tokens:
        assert f'"{token}"' in text
    i, j = 1, 2
    for value in (ref["dots"][i, j], ref["scaled"][i, j], ref["weights"][i, j], *ref["outputs"][i]):
        assert f"{value:.4f}" in text

    # q·k written out as the sum of products of the inputs, negatives in parentheses
    def factor(x: float) -> str:
        return f"({x:.4f})" if x < 0 else f"{x:.4f}"

    products = " + ".join(f"{factor(a)}×{factor(b)}" for a, b in zip(q[i], k[j], strict=True))
    assert f"q·k3 (think) = {products} = {ref['dots'][i, j]:.4f}" in text


def test_render_text_marks_masked_keys():
    text = render_text(example(causal=True))
    lines = text.splitlines()
    assert "Causal mask" in text
    first = lines.index(next(line for line in lines if line.startswith('Query 1 of 3: "the"')))
    block = "\n".join(lines[first : lines.index("", first)])
    assert "q·k2 (cat): masked" in block and "q·k3 (sat): masked" in block
    assert "w2 = 0.0000   (cat, masked)" in block
    e = np.exp(np.dot(EXAMPLE_Q[0], EXAMPLE_K[0]) / 2.0)
    assert f"w1 = {e:.4f} ÷ {e:.4f} = 1.0000" in block  # the only visible key


def test_render_text_query_without_visible_keys():
    q, k, v = random_qkv(3, 1, 2, 2, seed=9)
    text = render_text(explain(q, k, v, causal=True))
    assert "No key is visible to this query" in text
    assert "cross-attention" in text


def test_render_text_explains_the_shift_for_large_scores():
    q = [[40.0, 0.0]]
    k = [[40.0, 1.0], [-3.0, 40.0]]
    text = render_text(explain(q, k, [[1.0], [2.0]]))
    top = 1600.0 / np.sqrt(2)
    assert f"The largest score is {top:.4f}" in text
    assert f"exp(s2 - {top:.4f}) = exp({-120 / np.sqrt(2) - top:.4f})" in text


def test_render_text_summarises_long_dot_products():
    q, k, v = random_qkv(2, 2, 16, 2, seed=10)
    ref = reference(q, k, v)
    text = render_text(explain(q, k, v))
    assert f"q·k1 (t1) = sum of 16 products qₙ×kₙ = {ref['dots'][0, 0]:.4f}" in text


# ---- JSON ------------------------------------------------------------------------------------------------


def test_to_json_round_trips_with_numpys_numbers():
    q, k, v = random_qkv(2, 3, 2, 2, seed=11)
    data = json.loads(json.dumps(to_json(explain(q, k, v, tokens=["a", "b"], causal=True))))
    ref = reference(q, k, v, causal=True)
    assert data["tokens"] == ["a", "b"] and data["key_tokens"] == ["k1", "k2", "k3"]
    assert data["causal"] is True and data["d_k"] == 2
    np.testing.assert_allclose(data["q"], q)
    np.testing.assert_allclose(data["weights"], ref["weights"], atol=1e-12)
    np.testing.assert_allclose(data["outputs"], ref["outputs"], atol=1e-12)
    for i, row in enumerate(data["queries"]):
        assert row["token"] == ["a", "b"][i]
        assert row["visible"] == ref["visible"][i].tolist()
        np.testing.assert_allclose(row["dot_products"], ref["dots"][i], atol=1e-12)
        np.testing.assert_allclose(row["scaled_scores"], ref["scaled"][i], atol=1e-12)
        np.testing.assert_allclose(row["weights"], ref["weights"][i], atol=1e-12)
        np.testing.assert_allclose(row["output"], ref["outputs"][i], atol=1e-12)
