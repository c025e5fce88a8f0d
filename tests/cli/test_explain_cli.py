"""``qkv explain``: inputs from the command line and from files, text and JSON output, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qkv.cli import main
from qkv.viz.explain import EXAMPLE_K, EXAMPLE_Q, EXAMPLE_V


def numpy_attention(q, k, v, causal: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Weights and outputs of softmax(q·kᵀ/√d_k)·v, causal bottom-right aligned, in plain numpy."""
    q, k, v = (np.asarray(m, dtype=np.float64) for m in (q, k, v))
    scores = q @ k.T / np.sqrt(q.shape[1])
    if causal:
        allowed = np.tril(np.ones(scores.shape, dtype=bool), k=k.shape[0] - q.shape[0])
        scores = np.where(allowed, scores, -np.inf)
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights = e / e.sum(axis=1, keepdims=True)
    return weights, weights @ v


Q = [[1.0, 0.0], [0.5, -1.0]]
K = [[1.0, 1.0], [0.0, 1.0], [2.0, -0.5]]
V = [[1.0, 2.0, 0.0], [3.0, 4.0, 1.0], [-1.0, 0.5, 2.0]]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["explain", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_default_runs_the_builtin_example(capsys):
    status, out, err = run(capsys)
    assert status == 0 and err == ""
    assert "softmax(Q·Kᵀ / √d_k)" in out
    assert all(f'"{token}"' in out for token in ("the", "cat", "sat"))
    weights, outputs = numpy_attention(EXAMPLE_Q, EXAMPLE_K, EXAMPLE_V)
    assert f"{weights[1, 2]:.4f}" in out and f"{outputs[2, 0]:.4f}" in out


def test_builtin_example_causal_json(capsys):
    status, out, _ = run(capsys, "--causal", "--json")
    assert status == 0
    data = json.loads(out)
    weights, outputs = numpy_attention(EXAMPLE_Q, EXAMPLE_K, EXAMPLE_V, causal=True)
    assert data["causal"] is True and data["tokens"] == ["the", "cat", "sat"]
    np.testing.assert_allclose(data["weights"], weights, atol=1e-12)
    np.testing.assert_allclose(data["outputs"], outputs, atol=1e-12)


def test_matrices_and_tokens_from_the_command_line(capsys):
    q, k, v = [[1, 0], [0, 1]], [[1, 1], [0, 1]], [[1, 2], [3, 4]]
    status, out, err = run(
        capsys,
        "--q",
        json.dumps(q),
        "--k",
        json.dumps(k),
        "--v",
        json.dumps(v),
        "--tokens",
        "Acting",
        "Machines",
    )
    assert status == 0 and err == ""
    assert '"Acting"' in out and '"Machines"' in out
    weights, outputs = numpy_attention(q, k, v)
    assert f"= {weights[0, 1]:.4f}   (Machines)" in out
    assert "[" + ", ".join(f"{x:.4f}" for x in outputs[1]) + "]" in out


@pytest.mark.parametrize("causal", [False, True])
def test_json_output_matches_numpy(capsys, causal):
    argv = ["--q", json.dumps(Q), "--k", json.dumps(K), "--v", json.dumps(V), "--json"]
    status, out, _ = run(capsys, *argv, *(["--causal"] if causal else []))
    assert status == 0
    data = json.loads(out)
    weights, outputs = numpy_attention(Q, K, V, causal=causal)
    assert data["q"] == Q and data["k"] == K and data["v"] == V
    assert data["tokens"] == ["q1", "q2"] and data["key_tokens"] == ["k1", "k2", "k3"]
    np.testing.assert_allclose([row["weights"] for row in data["queries"]], weights, atol=1e-12)
    np.testing.assert_allclose([row["output"] for row in data["queries"]], outputs, atol=1e-12)
    np.testing.assert_allclose(
        [row["dot_products"] for row in data["queries"]], np.array(Q) @ np.array(K).T, atol=1e-12
    )


def test_file_input(capsys, tmp_path):
    path = tmp_path / "example.json"
    path.write_text(json.dumps({"q": Q, "k": K, "v": V, "tokens": ["I", "am"], "key_tokens": ["x", "y", "z"]}))
    status, out, _ = run(capsys, "--file", str(path), "--json")
    assert status == 0
    data = json.loads(out)
    assert data["tokens"] == ["I", "am"] and data["key_tokens"] == ["x", "y", "z"]
    np.testing.assert_allclose(data["weights"], numpy_attention(Q, K, V)[0], atol=1e-12)

    status, out, _ = run(capsys, "--file", str(path), "--tokens", "We", "are")
    assert status == 0 and '"We"' in out and "k2 (y)" in out and '"I"' not in out


def test_file_without_tokens(capsys, tmp_path):
    path = tmp_path / "plain.json"
    path.write_text(json.dumps({"q": Q, "k": Q, "v": Q}))
    status, out, _ = run(capsys, "--file", str(path))
    assert status == 0 and '"t1"' in out and "k2 (t2)" in out


def file_with(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.json"
    path.write_text(text)
    return str(path)


def qkv_args(q: str, k: str, v: str, *rest: str) -> list[str]:
    return ["--q", q, "--k", k, "--v", v, *rest]


BAD_ARGS = {
    "ragged rows": (
        qkv_args("[[1, 2], [3]]", "[[1, 2]]", "[[1]]"),
        "--q: row 2 has 1 number but row 1 has 2",
    ),
    "mismatched d_k": (
        qkv_args("[[1, 2]]", "[[1, 2, 3]]", "[[1]]"),
        "d_k differs: Q has 2 columns but K has 3",
    ),
    "non-number": (
        qkv_args("[[1]]", '[[1], ["x"]]', "[[1], [2]]"),
        "--k: row 2, column 1 is 'x', not a number",
    ),
    "invalid JSON": (qkv_args("[[1, 2]", "[[1, 2]]", "[[1]]"), "--q is not valid JSON"),
    "token count": (
        qkv_args("[[1]]", "[[1]]", "[[1]]", "--tokens", "a", "b"),
        "2 tokens given but Q has 1 row",
    ),
    "key token count": (
        qkv_args("[[1]]", "[[1], [2]]", "[[1], [2]]", "--key-tokens", "a"),
        "1 key token given but K has 2",
    ),
    "K/V rows": (qkv_args("[[1]]", "[[1], [2]]", "[[1]]"), "K has 2 rows but V has 1"),
    "empty": (qkv_args("[]", "[[1]]", "[[1]]"), "--q is empty"),
    "empty row": (qkv_args("[[1]]", "[[1]]", "[[]]"), "--v: row 1 is empty"),
    "not a matrix": (qkv_args("[1, 2]", "[[1]]", "[[1]]"), "--q: row 1 is 1, not a list of numbers"),
    "NaN": (qkv_args("[[NaN]]", "[[1]]", "[[1]]"), "--q: row 1, column 1 is nan, not a finite number"),
    "missing --v": (["--q", "[[1]]", "--k", "[[1]]"], "missing --v"),
    "builtin token count": (["--tokens", "a", "b"], "the built-in example has 3 tokens (the cat sat)"),
}


@pytest.mark.parametrize("argv, message", BAD_ARGS.values(), ids=BAD_ARGS.keys())
def test_bad_input_is_one_error_line(capsys, argv, message):
    status, out, err = run(capsys, *argv)
    assert_one_error_line(status, out, err, message)


def assert_one_error_line(status: int, out: str, err: str, message: str) -> None:
    assert status == 2
    assert out == ""
    assert err.startswith("qkv explain: error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert message in err


BAD_FILES = {
    "invalid JSON": ('{"q": [[1]], ', "is not valid JSON: Expecting"),
    "not an object": ("[[1]]", "expected a JSON object with keys q, k, v"),
    "missing key": ('{"q": [[1]], "k": [[1]]}', "missing key 'v'"),
    "unknown key": ('{"q": [[1]], "k": [[1]], "v": [[1]], "token": ["a"]}', "unknown key 'token'"),
    "tokens not strings": (
        '{"q": [[1]], "k": [[1]], "v": [[1]], "tokens": [1]}',
        "tokens must be a list of strings",
    ),
    "ragged rows": (
        '{"q": [[1, 2], [1]], "k": [[1]], "v": [[1]]}',
        ": q: row 2 has 1 number but row 1 has 2",
    ),
    "K/V rows": ('{"q": [[1]], "k": [[1], [2]], "v": [[1]]}', "K has 2 rows but V has 1"),
}


@pytest.mark.parametrize("text, message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_is_one_error_line(capsys, tmp_path, text, message):
    status, out, err = run(capsys, "--file", file_with(tmp_path, text))
    assert_one_error_line(status, out, err, message)


def test_missing_file_and_file_with_matrices(capsys, tmp_path):
    status, out, err = run(capsys, "--file", str(tmp_path / "nowhere.json"))
    assert_one_error_line(status, out, err, "cannot read --file")
    good = file_with(tmp_path, json.dumps({"q": Q, "k": K, "v": V}))
    status, out, err = run(capsys, "--file", good, "--q", "[[1]]")
    assert_one_error_line(status, out, err, "not both")


# ---- the installed console script -------------------------------------------------------------------------


def console_script() -> str:
    beside = Path(sys.executable).with_name("qkv")
    found = str(beside) if beside.exists() else shutil.which("qkv")
    assert found, "the `qkv` console script is not installed (pip install -e .)"
    return found


def script_env() -> dict[str, str]:
    return {**os.environ, "PYTHONIOENCODING": "utf-8"}


def test_console_script_runs():
    done = subprocess.run(
        [console_script(), "explain", "--json"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=script_env(),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(
        json.loads(done.stdout)["weights"], numpy_attention(EXAMPLE_Q, EXAMPLE_K, EXAMPLE_V)[0], atol=1e-12
    )


def test_console_script_stops_quietly_when_the_reader_goes_away():
    rng = np.random.default_rng(0)
    big = json.dumps(rng.normal(size=(40, 4)).round(3).tolist())  # several hundred kB of walk-through
    proc = subprocess.Popen(
        [console_script(), "explain", "--q", big, "--k", big, "--v", big],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=script_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"Attention(Q, K, V)")
    proc.stdout.close()  # like `qkv explain | head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert err == ""


# ---- inputs too deep or too large ----------------------------------------------------------------------------


def test_deeply_nested_json_is_one_error_line(capsys, tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    status, out, err = run(capsys, *qkv_args(deep, "[[1]]", "[[1]]"))
    assert_one_error_line(status, out, err, "--q is nested too deeply; expected a matrix")
    status, out, err = run(capsys, "--file", file_with(tmp_path, '{"q": ' + deep + "}"))
    assert_one_error_line(status, out, err, "is nested too deeply; expected an object with matrices q, k, v")


def test_more_scores_than_a_walk_through_is_meant_for_need_force(capsys):
    from qkv.cli.explain import MAX_SCORES

    rows = MAX_SCORES // 100 + 1
    q, k = json.dumps([[1.0]] * rows), json.dumps([[1.0]] * 100)
    status, out, err = run(capsys, *qkv_args(q, k, k))
    message = f"Q has {rows} rows and K has 100: {rows * 100:,} scores, more than the {MAX_SCORES:,}"
    assert_one_error_line(status, out, err, message)
    assert "--force" in err
    status, out, _ = run(capsys, *qkv_args(q, k, k, "--force", "--json"))
    assert status == 0 and len(json.loads(out)["weights"]) == rows
