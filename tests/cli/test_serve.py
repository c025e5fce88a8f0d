"""``qkv serve`` for real: a subprocess on a free port, queried over HTTP by httpx from several threads at once.

Its translations equal the offline Translator's on the same model directory, bad input is a 4xx naming the
field, SIGTERM stops it with status 0; a bad model directory, a port in use or a bad option is one error line.
The model directory is built here, tiny and random (weights N(0, 0.3), so outputs differ between inputs).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx", reason="qkv serve needs the deploy extra: pip install 'qkv[deploy]'")
pytest.importorskip("fastapi", reason="qkv serve needs the deploy extra: pip install 'qkv[deploy]'")
pytest.importorskip("uvicorn", reason="qkv serve needs the deploy extra: pip install 'qkv[deploy]'")

from qkv.cli import main  # noqa: E402
from qkv.models import save_model  # noqa: E402
from qkv.train.translate import Translator, save_tokenizers  # noqa: E402

ALPHABET = "abcdefghij ,.0123456789"  # the characters of the tiny translator (tests/conftest.py)
STARTUP_S = 60.0  # importing torch and fastapi on a busy 2-core machine


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, translator: Translator) -> Path:
    """The tiny random translator of ``tests/conftest.py`` as a model directory."""
    directory = tmp_path_factory.mktemp("serve") / "model"
    save_model(translator.model, directory)
    save_tokenizers(directory, translator.src_tokenizer, translator.tgt_tokenizer, shared=True)
    return directory


def stop(process: subprocess.Popen) -> int:
    """SIGTERM, then SIGKILL if it has not ended within 10 s; its exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory) -> Iterator[Server]:
    """``qkv serve`` in a subprocess on a free port, up once ``/health`` answers; always stopped afterwards."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve_log") / "serve.log"
    argv = [sys.executable, "-m", "qkv", "serve", "--model", str(model_dir), "--port", str(port), "--threads", "1"]
    argv += ["--max-sentences", "8", "--max-chars", "50", "--log-level", "warning"]
    with log.open("w", encoding="utf-8") as out:
        process = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"qkv serve exited with {process.returncode}:\n{log.read_text(encoding='utf-8')}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"qkv serve did not answer /health within {STARTUP_S:g} s:\n{log.read_text(encoding='utf-8')}"
                )
            time.sleep(0.05)
        yield Server(url, process, log)
    finally:
        stop(process)


def test_serve_prints_its_url(server: Server) -> None:
    first = server.log.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("qkv serve: ") and f" at {server.url} (POST /translate, GET /health)" in first


def test_concurrent_clients_get_the_offline_translations_of_their_own_input(
    server: Server, model_dir: Path, one_thread: None
) -> None:
    rng = random.Random(0)
    sentences = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 20))) for _ in range(24)]
    requests = [(sentences[i : i + 1 + i % 3], 1 + 2 * (i % 2)) for i in range(0, 24, 2)]  # beam 1 or 3

    def post(request: tuple[list[str], int]) -> httpx.Response:
        text, beam = request
        return httpx.post(f"{server.url}/translate", json={"text": text, "beam": beam}, timeout=30)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, requests))
    translator = Translator.load(model_dir)
    outputs = set()
    for (text, beam), response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        want = [t.text for t in translator.translate(text, beam=beam)]
        assert response.json() == {"translations": [{"text": t} for t in want]}
        outputs.update(want)
    assert len(outputs) >= 0.8 * sum(len(text) for text, _ in requests)  # input-dependent: a mix-up would show
    assert httpx.get(f"{server.url}/health").json()["batches"] >= 1


@pytest.mark.parametrize(
    ("content", "status", "field", "words"),
    [
        (b'{"text": ["abc"', 400, "body", "body is not JSON"),
        (b'{"text": []}', 422, "text", "text must be a list of 1 to 8 strings (the server's max_sentences); got []"),
        (b'{"text": ["' + b"a" * 51 + b'"]}', 413, "text[0]", "at most 50 characters (the server's max_chars)"),
        (b'{"text": ["a"], "beam": 99}', 422, "beam", "beam must be an int in [1, 16]"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(
    server: Server, content: bytes, status: int, field: str, words: str
) -> None:
    response = httpx.post(f"{server.url}/translate", content=content, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["field"] == field and words in error["message"]


def test_sigterm_stops_the_server_cleanly(server: Server) -> None:
    """Runs last in this module: it stops the module's server."""
    assert stop(server.process) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=2)


def run_serve(capsys, monkeypatch, *argv: str) -> tuple[int, str]:
    import uvicorn

    def must_not_serve(*args: object, **kwargs: object) -> None:
        raise AssertionError("qkv serve started serving despite the error")

    monkeypatch.setattr(uvicorn.Server, "run", must_not_serve)
    status = main(["serve", *argv])
    out, err = capsys.readouterr()
    return status, err


def test_a_missing_model_directory_is_one_error_line(capsys, monkeypatch, tmp_path: Path) -> None:
    status, err = run_serve(capsys, monkeypatch, "--model", str(tmp_path / "nope"))
    assert (status, err) == (
        2,
        f"qkv serve: error: --model {tmp_path / 'nope'}: no such directory; expected a model "
        "directory written by qkv train\n",
    )
    status, err = run_serve(capsys, monkeypatch, "--model", str(tmp_path))
    assert status == 2 and err.startswith(f"qkv serve: error: {tmp_path} has no tokenizers")


def test_a_port_in_use_is_one_error_line(capsys, monkeypatch, model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, err = run_serve(capsys, monkeypatch, "--model", str(model_dir), "--port", str(port))
    assert status == 2
    assert err == (
        f"qkv serve: error: --port {port}: 127.0.0.1:{port} is already in use (another server?); choose another "
        "--port, or 0 for any free one\n"
    )


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--port", "70000", "--port must be an int in [0, 65535] (0: any free port); got 70000"),
        ("--max-beam", "0", "--max-beam must be an int >= 1; got 0"),
        ("--max-wait-ms", "-1", "--max-wait-ms must be a number of milliseconds >= 0; got -1.0"),
        ("--host", "no.such.host.invalid", "--host no.such.host.invalid: not an address of this machine"),
    ],
)
def test_a_bad_option_is_one_error_line(
    capsys, monkeypatch, model_dir: Path, option: str, value: str, message: str
) -> None:
    status, err = run_serve(capsys, monkeypatch, "--model", str(model_dir), "--port", "0", option, value)
    assert status == 2 and err.startswith(f"qkv serve: error: {message}")
