"""``qkv serve --model DIR [--host 127.0.0.1] [--port 8000]``: a translation model as an HTTP JSON service.

Loads a model directory written by ``qkv train`` and serves it with uvicorn (:mod:`qkv.deploy.server`:
``POST /translate``, ``GET /health``; :mod:`qkv.deploy.request`: the request, its limits and errors)::

    qkv serve --model runs/demo --port 8000
    curl -s localhost:8000/translate -d '{"text": ["Tuesday, March 9, 1993"], "beam": 5}'

The address is bound before the server starts, so a port in use is one error line, and ``--port 0`` takes
any free port (the printed URL says which). A bad option, model directory or address is one line
``qkv serve: error: ...`` and exit status 2. Ctrl-C (SIGINT) or SIGTERM stops it gracefully: requests in
progress finish first, and the exit status is 0. Needs the ``deploy`` extra (``pip install 'qkv[deploy]'``:
fastapi, uvicorn).
"""

from __future__ import annotations

import argparse
import errno
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn

EPILOG = """\
examples:
  qkv serve --model runs/demo --port 8000
  curl -s localhost:8000/translate -d '{"text": ["Tuesday, March 9, 1993"], "beam": 5}'
  curl -s localhost:8000/translate -d '{"text": ["6/1/02"], "alignment": true}'
  curl -s localhost:8000/health
"""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
MAX_PORT = 65535


def register(sub: argparse._SubParsersAction) -> None:
    from qkv.deploy.micro_batcher import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_WAIT_MS
    from qkv.deploy.request import ServeLimits

    limits = ServeLimits()
    p = sub.add_parser(
        "serve",
        help="serve a translation model over HTTP (POST /translate, GET /health)",
        description="Serve a model directory written by qkv train as an HTTP JSON API, batching concurrent "
        "requests together.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, required=True, metavar="DIR", help="model directory (qkv train's output.dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, metavar="N", help="port; 0 takes any free one (default 8000)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="where to run (default cpu)")
    p.add_argument("--threads", type=int, metavar="N", help="torch threads for decoding (default: torch's choice)")
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=DEFAULT_MAX_BATCH_TOKENS,
        metavar="N",
        help=f"source tokens per batch of merged requests (default {DEFAULT_MAX_BATCH_TOKENS})",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=DEFAULT_MAX_WAIT_MS,
        metavar="MS",
        help=f"how long a request waits for others to share its batch (default {DEFAULT_MAX_WAIT_MS:g})",
    )
    for name, what in (
        ("max_sentences", "the most sentences in a request"),
        ("max_chars", "the most characters in a sentence"),
        ("max_body_bytes", "the most bytes in a request body"),
        ("max_beam", "the largest beam a request may ask for"),
    ):
        default = getattr(limits, name)
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=int, default=default, metavar="N", help=f"{what} (default {default})")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="uvicorn's log level (default info)")
    p.set_defaults(run=run)


def _fail(message: str) -> int:
    print(f"qkv serve: error: {message}", file=sys.stderr)
    return 2


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening; uvicorn listens on it).

    Raises:
        ValueError: the host cannot be resolved, the port is in use, or the address cannot be bound.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart at once after a stop
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(
                f"--port {port}: {host}:{port} is already in use (another server?); choose another --port, "
                "or 0 for any free one"
            ) from None
        raise ValueError(f"cannot listen on --host {host} --port {port}: {e.strerror or e}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket (an IPv6 host in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _stopped(signum: int, frame: FrameType | None) -> None:
    """The signal that stopped the server, raised again by uvicorn once it has shut down: nothing left to do."""


def serve_until_stopped(server: uvicorn.Server, sock: socket.socket) -> None:
    """Run ``server`` on ``sock`` until SIGINT or SIGTERM stops it gracefully (requests in progress finish).

    uvicorn raises the stopping signal again after its shutdown, for the handler it found to end the process
    by that signal (SIGTERM: killed; SIGINT: a ``KeyboardInterrupt`` traceback). A stop that was asked for is
    the normal end of a server, so the handler it finds here does nothing and ``qkv serve`` returns 0.
    """
    if threading.current_thread() is not threading.main_thread():  # no signal handlers there, nor uvicorn's
        server.run(sockets=[sock])
        return
    previous = {sig: signal.signal(sig, _stopped) for sig in STOP_SIGNALS}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _check_options(args: argparse.Namespace) -> None:
    """``ValueError`` naming the option when one is out of range."""
    from qkv.checks import int_at_least, non_negative_number, number_between

    expected = f"an int in [0, {MAX_PORT}] (0: any free port)"
    int_at_least("--port", args.port, 0, expected=expected)
    number_between("--port", args.port, 0, MAX_PORT, expected=expected)
    if args.threads is not None:
        int_at_least("--threads", args.threads)
    int_at_least("--max-batch-tokens", args.max_batch_tokens)
    non_negative_number("--max-wait-ms", args.max_wait_ms, expected="a number of milliseconds >= 0")
    for flag in ("--max-sentences", "--max-chars", "--max-body-bytes", "--max-beam"):
        int_at_least(flag, getattr(args, flag[2:].replace("-", "_")))


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from qkv.deploy.server import create_app
    except ImportError as e:
        return _fail(f"qkv serve needs the deploy extra ({e.name} is missing): pip install 'qkv[deploy]'")
    import torch

    from qkv.data.parallel import DataError
    from qkv.deploy.request import ServeLimits
    from qkv.train.translate import Translator

    try:
        _check_options(args)
        if not args.model.is_dir():
            raise ValueError(
                f"--model {args.model}: no such directory; expected a model directory written by qkv train"
            )
        translator = Translator.load(args.model, device=args.device)
        sock = bind_socket(args.host, args.port)
    except (OSError, ValueError, DataError) as e:
        return _fail(str(e))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    limits = ServeLimits(
        max_sentences=args.max_sentences,
        max_chars=args.max_chars,
        max_body_bytes=args.max_body_bytes,
        max_beam=args.max_beam,
    )
    app = create_app(translator, limits=limits, max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level))
    print(f"qkv serve: {args.model} at {url_of(sock)} (POST /translate, GET /health); Ctrl-C stops", flush=True)
    with sock:
        serve_until_stopped(server, sock)
    return 0
