"""Load test of ``qkv serve``: N concurrent clients for a fixed time on localhost, every response checked.

Starts ``qkv serve`` in a subprocess on a free port (up once ``GET /health`` answers), then runs
``--clients`` threads, each with its own ``httpx.Client``, sending ``POST /translate`` requests back to back
(1 to ``--sentences-per-request`` sentences drawn at random from the sentence pool, beam ``--beam``) until
``--duration`` seconds have passed or ``--max-requests`` requests have been sent in all. It then stops the
server, translates every sentence that was sent with :meth:`qkv.train.translate.Translator.translate` in
this process (same options), and checks each response against it: a **mismatch** is a response whose
translations are not exactly the offline translations of its own sentences, in order (something dropped,
mixed between requests, or decoded differently); an **error** is a non-200 answer or a failed connection.

Reported: requests/s and sentences/s over the load phase, latency percentiles (p50, p90, p99, max; one
request, sent to answered), the server's batches (``translate`` calls; sentences per batch shows the
micro-batching), errors and mismatches (both must be 0: the exit status is 1 otherwise), and, for scale,
the offline sentences/s of the one batched ``translate`` call over the distinct sentences sent.

Model: ``--model DIR``; by default ``runs/demo`` when it holds a trained model, else a randomly initialized
model of the demo's shape (64 wide, 2 + 2 layers, 4 heads, FFN 256, a character tokenizer of the
sentences) written to a temporary directory, its weights drawn from N(0, 0.3): the default initialization
translates nearly every input to the same string, which would hide a response given to the wrong request.
Sentences: ``--input FILE`` (one a line), by default the model directory's ``data/test.src`` when there is
one, else the test split of the built-in dates corpus the demo trains on (12,000 pairs, seed 0: 1,200
sentences; needs the ``data`` extra).

Usage::

    python benchmarks/serve_load.py                                   # 8 clients, 20 s
    python benchmarks/serve_load.py --model runs/demo --clients 16 --duration 30 --json serve.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from qkv.data.tokenizer import CharTokenizer
from qkv.models import TransformerConfig, TransformerSeq2Seq, save_model
from qkv.train.translate import Translator, save_tokenizers

DEMO_DIR = Path("runs/demo")
DEMO_SHAPE = {"d_model": 64, "num_heads": 4, "encoder_layers": 2, "decoder_layers": 2, "ffn_dim": 256}
RANDOM_STD = 0.3
STARTUP_S = 120.0
REQUEST_TIMEOUT_S = 120.0


@dataclass
class Outcome:
    """One request: what was sent, how long the answer took, and what came back (``texts`` when 200)."""

    sentences: list[str]
    seconds: float
    status: int | None  # None: the connection failed
    texts: list[str] | None
    error: str | None = None


def write_random_model(directory: Path, sentences: list[str], shape: dict[str, int], seed: int = 0) -> Path:
    """A random Transformer of ``shape`` with a character tokenizer of ``sentences``, saved as ``qkv train`` does."""
    tokenizer = CharTokenizer.train(sentences)
    v = tokenizer.vocab_size
    torch.manual_seed(seed)
    model = TransformerSeq2Seq(TransformerConfig(src_vocab_size=v, tgt_vocab_size=v, dropout=0.0, **shape))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=RANDOM_STD)
    save_model(model, directory)
    save_tokenizers(directory, tokenizer, tokenizer, shared=True)
    return directory


def read_sentences(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def demo_test_sentences() -> list[str]:
    from qkv.data.corpus import generate_corpus

    return [src for src, _ in generate_corpus("dates", 12_000, seed=0).test]


def resolve(args: argparse.Namespace, workdir: Path) -> tuple[Path, str, list[str]]:
    """``(model directory, what it is, sentences)`` from the options and their defaults (module docstring)."""
    model = args.model
    if model is None and (DEMO_DIR / "model.safetensors").is_file():
        model = DEMO_DIR
    if args.input is not None:
        sentences = read_sentences(args.input)
    elif model is not None and (model / "data" / "test.src").is_file():
        sentences = read_sentences(model / "data" / "test.src")
    else:
        sentences = demo_test_sentences()
    if not sentences:
        raise SystemExit("serve_load: no sentences to send (an empty --input?)")
    if model is not None:
        return model, str(model), sentences
    shape = ", ".join(f"{k}={v}" for k, v in DEMO_SHAPE.items())
    directory = write_random_model(workdir / "model", sentences, DEMO_SHAPE, args.seed)
    return directory, f"random ({shape}; weights N(0, {RANDOM_STD}))", sentences


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    """``qkv serve`` on a free port, once ``/health`` answers; ``SystemExit`` with its log if it does not."""
    port = free_port()
    argv = [sys.executable, "-m", "qkv", "serve", "--model", str(model), "--port", str(port), "--log-level", "warning"]
    argv += ["--max-sentences", str(args.sentences_per_request), "--max-batch-tokens", str(args.max_batch_tokens)]
    if args.server_threads:
        argv += ["--threads", str(args.server_threads)]
    with log.open("w", encoding="utf-8") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    stop_server(process)
    raise SystemExit(f"serve_load: qkv serve did not start:\n{log.read_text(encoding='utf-8')}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def client(
    url: str, pool: list[str], args: argparse.Namespace, seed: int, deadline: float, sent: Iterator[int]
) -> list[Outcome]:
    """Requests back to back until ``deadline`` or until ``sent`` (a shared counter) reaches ``--max-requests``."""
    rng = random.Random(seed)
    outcomes = []
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as http:
        while time.monotonic() < deadline and next(sent) < args.max_requests:
            sentences = rng.sample(pool, rng.randint(1, min(args.sentences_per_request, len(pool))))
            start = time.perf_counter()
            try:
                response = http.post("/translate", json={"text": sentences, "beam": args.beam})
            except httpx.HTTPError as e:
                outcomes.append(Outcome(sentences, time.perf_counter() - start, None, None, f"{type(e).__name__}: {e}"))
                continue
            seconds = time.perf_counter() - start
            if response.status_code != 200:
                outcomes.append(Outcome(sentences, seconds, response.status_code, None, response.text[:200]))
                continue
            texts = [t["text"] for t in response.json()["translations"]]
            outcomes.append(Outcome(sentences, seconds, 200, texts))
    return outcomes


def count_mismatches(outcomes: list[Outcome], offline: dict[str, str]) -> int:
    """Answered requests whose translations are not exactly ``offline``'s for their own sentences, in order."""
    return sum(o.texts is not None and o.texts != [offline[s] for s in o.sentences] for o in outcomes)


def load(url: str, pool: list[str], args: argparse.Namespace) -> tuple[list[Outcome], float]:
    """Every client's outcomes and the wall time of the load phase."""
    sent = itertools.count()  # next() is atomic under the GIL
    start = time.perf_counter()
    deadline = time.monotonic() + args.duration
    with ThreadPoolExecutor(args.clients) as threads:
        futures = [threads.submit(client, url, pool, args, args.seed + i, deadline, sent) for i in range(args.clients)]
        outcomes = [o for f in futures for o in f.result()]
    return outcomes, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        workdir = Path(tmp)
        model, model_name, sentences = resolve(args, workdir)
        pool = sentences[: args.pool]
        process, url = start_server(model, args, workdir / "serve.log")
        try:
            outcomes, seconds = load(url, pool, args)
            health = httpx.get(f"{url}/health", timeout=10).json()
        finally:
            stop_server(process)
        if args.server_threads:
            torch.set_num_threads(args.server_threads)
        translator = Translator.load(model)
        distinct = sorted({s for o in outcomes for s in o.sentences})
        start = time.perf_counter()
        offline = dict(zip(distinct, [t.text for t in translator.translate(distinct, beam=args.beam)], strict=True))
        offline_seconds = time.perf_counter() - start
    answered = [o for o in outcomes if o.texts is not None]
    latencies_ms = np.array([o.seconds * 1000 for o in answered]) if answered else np.zeros(1)
    answered_sentences = sum(len(o.sentences) for o in answered)
    return {
        "benchmark": "serve_load",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": model_name,
        "sentence_pool": len(pool),
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_1min": os.getloadavg()[0],  # other jobs on the machine, at the end of the run
        },
        "convention": "requests/s and sentences/s: answered requests (200) and their sentences / wall time of the "
        "load phase; latency: one request, sent to answered, 200s only",
        "requests": len(outcomes),
        "answered": len(answered),
        "sentences": answered_sentences,
        "seconds": seconds,
        "requests_per_s": len(answered) / seconds,
        "sentences_per_s": answered_sentences / seconds,
        "latency_ms": {q: float(np.percentile(latencies_ms, p)) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"max": float(latencies_ms.max())},
        "server_batches": health["batches"],
        "sentences_per_batch": answered_sentences / max(1, health["batches"]),
        "errors": len(outcomes) - len(answered),
        "first_errors": [o.error for o in outcomes if o.texts is None][:3],
        "mismatches": count_mismatches(outcomes, offline),
        "distinct_sentences_sent": len(distinct),
        "distinct_offline_translations": len(set(offline.values())),
        "offline_sentences_per_s": len(distinct) / offline_seconds,
    }


def table(report: dict[str, Any]) -> str:
    c, lat = report["config"], report["latency_ms"]
    return "\n".join(
        [
            f"model: {report['model']}; {report['sentence_pool']} sentences in the pool, 1 to "
            f"{c['sentences_per_request']} per request, beam {c['beam']}, {c['clients']} clients",
            "",
            "| requests | sentences | seconds | requests/s | sentences/s | p50 ms | p90 ms | p99 ms | max ms | "
            "batches | sentences/batch | errors | mismatches |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {report['answered']} | {report['sentences']} | {report['seconds']:.1f} | "
            f"{report['requests_per_s']:.1f} | {report['sentences_per_s']:.1f} | {lat['p50']:.0f} | {lat['p90']:.0f} | "
            f"{lat['p99']:.0f} | {lat['max']:.0f} | {report['server_batches']} | {report['sentences_per_batch']:.1f} | "
            f"{report['errors']} | {report['mismatches']} |",
            "",
            f"offline, one batched translate call over the {report['distinct_sentences_sent']} distinct sentences "
            f"sent: {report['offline_sentences_per_s']:.1f} sentences/s "
            f"({report['distinct_offline_translations']} distinct translations)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="model directory (default: runs/demo if trained, else random)")
    parser.add_argument("--input", type=Path, help="sentences, one a line (default: see the module docstring)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    parser.add_argument("--max-requests", type=int, default=5000, help="requests in all, at most (default 5000)")
    parser.add_argument("--sentences-per-request", type=int, default=4, help="1 to N per request (default 4)")
    parser.add_argument("--pool", type=int, default=300, help="the first N sentences are drawn from (default 300)")
    parser.add_argument("--beam", type=int, default=5, help="beam size (default 5)")
    parser.add_argument("--max-batch-tokens", type=int, default=4096, help="qkv serve's budget (default 4096)")
    parser.add_argument("--server-threads", type=int, default=0, help="qkv serve --threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench-results/serve_load.json"))
    args = parser.parse_args(argv)
    for name in ("clients", "max_requests", "sentences_per_request", "pool", "beam", "max_batch_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not args.duration > 0:
        parser.error("--duration must be > 0")
    report = run(args)
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    if report["errors"] or report["mismatches"]:
        print(f"FAILED: {report['errors']} errors, {report['mismatches']} mismatches", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
