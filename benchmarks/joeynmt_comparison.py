"""qkv against JoeyNMT 2.3: training throughput (target tokens/s) and beam-5 decoding speed (sentences/s).

Both train the same Transformer (width, heads, layers, feed-forward size, dropout, pre-LN, output layer
tied to the target embedding) on the same generated corpus (``qkv.data.generate_corpus``, written once and
read by both), character level with separate vocabularies, token batches of the same budget, AdamW with
the same warmup + inverse-square-root schedule and label smoothing, for the same number of updates,
validating only once at the end.

* **training tokens/s**: target tokens (EOS included, padding not) per second of training time, validation
  excluded, as both report it: qkv's ``train.log`` ("tokens/s N") and JoeyNMT's log ("Tokens per Sec: N").
  The first log interval (start-up, allocator warm-up) is dropped and the median of the rest reported.
* **decoding sentences/s**: the test split translated with beam search (beam 5, length penalty α = 1),
  model loading excluded: qkv times :meth:`qkv.train.translate.Translator.translate`; JoeyNMT's test pass
  after training logs "Generation took X[sec]" per split. Decoding time grows with the output length, and
  the two stop an unfinished hypothesis at different limits, so compare trained models (the JSON has each
  side's ``mean_output_chars``); a barely trained model's outputs run to the limit.
* **quality**: both sides' beam-5 test outputs (qkv's, and JoeyNMT's ``best.hyps.test``) scored by the same
  function, :func:`qkv.train.evaluate.score`: sacrebleu BLEU and chrF, and exact match. On the numbers corpus
  a translation is one German word, so BLEU (word 4-grams) is 0 for both; compare chrF and exact match there.

Each side runs in its own process with the same thread count (``--threads``); JoeyNMT in its own virtual
environment, since its dependencies are not qkv's::

    python3 -m venv /tmp/joey-venv
    /tmp/joey-venv/bin/pip install torch==2.13.0                # the same torch as qkv's, first
    /tmp/joey-venv/bin/pip install joeynmt==2.3.0 importlib-metadata torch==2.13.0

Usage::

    python benchmarks/joeynmt_comparison.py --joey-python /tmp/joey-venv/bin/python --json joey.json
    python benchmarks/joeynmt_comparison.py --steps 20 --size 600 --workdir /tmp/jc   # does it start? (~1 min)
    python benchmarks/joeynmt_comparison.py --device cuda --steps 2000 --d-model 256 --layers 3

The default (dates corpus, 12,000 pairs, d_model 128, 2+2 layers, 600 updates) takes about 20 minutes on
2 CPU cores. Differences in what is timed remain (JoeyNMT's data loader runs inside its timed loop, qkv's
batching too); the JSON records both sides' settings and parameter counts so a reader can check the models
match.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

QKV_TOKENS = re.compile(r"tokens/s (\d+)")
QKV_PARAMS = re.compile(r"training \w+ \(([\d,]+) parameters\)")
JOEY_TOKENS = re.compile(r"Tokens per Sec:\s*([\d.]+)")
JOEY_PARAMS = re.compile(r"Total params: (\d+)")
JOEY_SPLIT = re.compile(r"(?:Decoding|Scoring) on (\w+) set")
JOEY_GENERATION = re.compile(r"Generation took ([\d.]+)\[sec\]")
JOEY_BLEU = re.compile(r"Evaluation result \(beam search\): bleu:\s*([\d.]+)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--joey-python", default="/tmp/joey-venv/bin/python", help="python of the JoeyNMT venv")
    p.add_argument("--workdir", type=Path, default=Path("runs/joeynmt_comparison"), help="data, models, logs")
    p.add_argument("--json", type=Path, help="write the results here (default: <workdir>/results.json)")
    p.add_argument("--corpus", default="dates", choices=("numbers", "dates", "copy", "reverse"))
    p.add_argument("--size", type=int, default=12_000, help="pairs in train + valid + test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=600, help="optimizer updates")
    p.add_argument("--log-every", type=int, default=50, help="updates per throughput sample")
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget of a training batch")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=2, help="encoder and decoder layers each")
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--decode-max-tokens", type=int, default=2048, help="token budget of a decoding batch")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of each run")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--skip-joeynmt", action="store_true", help="run the qkv side only")
    p.add_argument("--skip-qkv", action="store_true", help="run the JoeyNMT side only")
    return p.parse_args(argv)


def environment(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def median_after_first(values: list[float]) -> float | None:
    """The median throughput, without the first (warm-up) sample when there are others."""
    if not values:
        return None
    return statistics.median(values[1:] if len(values) > 1 else values)


def prepare_corpus(args: argparse.Namespace) -> Path:
    """Generate the corpus once; both sides read ``data/{train,valid,test}.{src,tgt}``."""
    from qkv.data.corpus import generate_corpus, write_corpus

    data = args.workdir / "data"
    corpus = generate_corpus(args.corpus, args.size, seed=args.seed)
    write_corpus(corpus, data)
    return data


def score_outputs(outputs: list[str], references: Path) -> dict[str, Any]:
    """BLEU, chrF and exact match of ``outputs`` against the lines of ``references``, the same for both sides."""
    from qkv.train.evaluate import score

    scores = score(outputs, references.read_text(encoding="utf-8").splitlines())
    return {
        "test_bleu": scores.bleu,
        "test_chrf": scores.chrf,
        "test_exact_match": scores.exact_match,
        "mean_output_chars": sum(map(len, outputs)) / len(outputs),
        "bleu_signature": scores.bleu_signature,
        "chrf_signature": scores.chrf_signature,
    }


def run_logged(command: list[str], log_path: Path, threads: int) -> tuple[int, float]:
    """Run ``command`` with its output in ``log_path``; returns the exit status and wall seconds."""
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=environment(threads)).returncode
    return status, time.perf_counter() - started


# -- qkv ---------------------------------------------------------------------------------------------------


def qkv_config(args: argparse.Namespace, data: Path, model_dir: Path) -> dict[str, Any]:
    return {
        "data": {
            "train": {"src": str(data / "train.src"), "tgt": str(data / "train.tgt")},
            "valid": {"src": str(data / "valid.src"), "tgt": str(data / "valid.tgt")},
            "tokenizer": "char",
        },
        "model": {
            "type": "transformer",
            "d_model": args.d_model,
            "num_heads": args.heads,
            "encoder_layers": args.layers,
            "decoder_layers": args.layers,
            "ffn_dim": args.ffn,
            "dropout": args.dropout,
            "norm_first": True,
            "tie_embeddings": True,
        },
        "training": {
            "seed": args.seed,
            "max_steps": args.steps,
            "max_tokens": args.max_tokens,
            "lr": args.lr,
            "betas": [0.9, 0.98],
            "schedule": "inverse_sqrt",
            "warmup_steps": args.warmup,
            "clip_norm": 1.0,
            "label_smoothing": 0.1,
            "device": args.device,
            "valid_every": args.steps,
            "valid_max_sentences": 200,
            "early_stopping_metric": "loss",
        },
        "output": {
            "dir": str(model_dir),
            "checkpoint_every": args.steps,
            "keep_last": 1,
            "export": "last",
            "log_every": args.log_every,
            "progress_bar": False,
        },
    }


def run_qkv(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    work = args.workdir / "qkv"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)  # qkv train refuses a directory with checkpoints unless resuming
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(qkv_config(args, data, model_dir), sort_keys=False), encoding="utf-8")
    command = [sys.executable, "-m", "qkv", "train", str(config_path)]
    status, wall = run_logged(command, work / "train.out", args.threads)
    log = (model_dir / "train.log").read_text(encoding="utf-8") if (model_dir / "train.log").is_file() else ""
    result: dict[str, Any] = {"status": status, "train_wall_seconds": wall, "config": str(config_path)}
    if status != 0:
        result["error"] = (work / "train.out").read_text(encoding="utf-8")[-3000:]
        return result
    samples = [float(x) for x in QKV_TOKENS.findall(log)]
    params = QKV_PARAMS.search(log)
    result.update(
        train_tokens_per_s=median_after_first(samples),
        train_tokens_per_s_samples=samples,
        parameters=int(params.group(1).replace(",", "")) if params else None,
    )
    decode_out, hyps = work / "decode.json", work / "test.hyps"
    status, _ = run_logged(
        [
            sys.executable,
            __file__,
            "--_decode-qkv",
            str(model_dir),
            str(data / "test.src"),
            str(hyps),
            str(args.beam),
            str(args.decode_max_tokens),
            args.device,
            str(decode_out),
        ],
        work / "decode.out",
        args.threads,
    )
    if status != 0:
        result["error"] = (work / "decode.out").read_text(encoding="utf-8")[-3000:]
        return result
    result.update(json.loads(decode_out.read_text(encoding="utf-8")))
    result.update(score_outputs(hyps.read_text(encoding="utf-8").splitlines(), data / "test.tgt"))
    return result


def decode_qkv(argv: list[str]) -> None:
    """Internal: time beam search over the test split in this process (model loading excluded); the outputs
    go to the ``hyps`` file, one line each."""
    import torch

    from qkv.train.translate import Translator

    model_dir, src, hyps, beam, max_tokens, device, out = argv
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    sources = Path(src).read_text(encoding="utf-8").splitlines()
    translator = Translator.load(model_dir, device=device)
    translator.translate(sources[:8], beam=int(beam), max_tokens=int(max_tokens))  # warm-up
    started = time.perf_counter()
    results = translator.translate(sources, beam=int(beam), max_tokens=int(max_tokens))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    Path(hyps).write_text("".join(r.text + "\n" for r in results), encoding="utf-8")
    Path(out).write_text(
        json.dumps(
            {
                "decode_sentences": len(sources),
                "decode_seconds": seconds,
                "decode_sentences_per_s": len(sources) / seconds,
            }
        ),
        encoding="utf-8",
    )


# -- JoeyNMT -------------------------------------------------------------------------------------------------


def joey_config(args: argparse.Namespace, data: Path, model_dir: Path) -> dict[str, Any]:
    side = {"level": "char", "lowercase": False, "normalize": False, "max_length": -1, "voc_min_freq": 1}
    stack = {
        "type": "transformer",
        "num_layers": args.layers,
        "num_heads": args.heads,
        "embeddings": {"embedding_dim": args.d_model, "scale": True, "dropout": args.dropout},
        "hidden_size": args.d_model,
        "ff_size": args.ffn,
        "dropout": args.dropout,
        "layer_norm": "pre",
    }
    return {
        "name": "qkv-comparison",
        "joeynmt_version": "2.3.0",
        "model_dir": str(model_dir),
        "use_cuda": args.device == "cuda",
        "fp16": False,
        "random_seed": args.seed,
        "data": {
            "train": str(data / "train"),
            "dev": str(data / "valid"),
            "test": str(data / "test"),
            "dataset_type": "plain",
            "src": {"lang": "src", **side},
            "trg": {"lang": "tgt", **side},
        },
        "testing": {
            "n_best": 1,
            "beam_size": args.beam,
            "beam_alpha": 1.0,
            "batch_size": args.decode_max_tokens,
            "batch_type": "token",
            "eval_metrics": ["bleu"],
            "sacrebleu_cfg": {"tokenize": "13a"},
        },
        "training": {
            "optimizer": "adamw",
            "adam_betas": [0.9, 0.98],
            "learning_rate": args.lr,
            "learning_rate_min": 1e-9,
            "scheduling": "warmupinversesquareroot",
            "learning_rate_warmup": args.warmup,
            "weight_decay": 0.0,
            "label_smoothing": 0.1,
            "loss": "crossentropy",
            "normalization": "tokens",
            "clip_grad_norm": 1.0,
            "batch_size": args.max_tokens,
            "batch_type": "token",
            "batch_multiplier": 1,
            "epochs": 1_000_000,
            "updates": args.steps,
            "validation_freq": args.steps,
            "logging_freq": args.log_every,
            "early_stopping_metric": "loss",
            "keep_best_ckpts": 1,
            "overwrite": True,
            "shuffle": True,
            "print_valid_sents": [0],
        },
        "model": {
            "initializer": "xavier_uniform",
            "bias_initializer": "zeros",
            "embed_initializer": "xavier_uniform",
            "tied_embeddings": False,
            "tied_softmax": True,
            "encoder": stack,
            "decoder": dict(stack),
        },
    }


def run_joeynmt(args: argparse.Namespace, data: Path) -> dict[str, Any]:
    work = args.workdir / "joeynmt"
    work.mkdir(parents=True, exist_ok=True)
    if not Path(args.joey_python).is_file():
        return {"status": None, "error": f"{args.joey_python} not found; see the set-up in this script's docstring"}
    model_dir = work / "model"
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(joey_config(args, data, model_dir), sort_keys=False), encoding="utf-8")
    out = work / "train.out"
    status, wall = run_logged([args.joey_python, "-m", "joeynmt", "train", str(config_path)], out, args.threads)
    log = out.read_text(encoding="utf-8", errors="replace")
    result: dict[str, Any] = {"status": status, "train_wall_seconds": wall, "config": str(config_path)}
    if status != 0:
        result["error"] = log[-3000:]
        return result
    samples = [float(x) for x in JOEY_TOKENS.findall(log)]
    params = JOEY_PARAMS.search(log)
    generation: dict[str, float] = {}
    split = None
    for line in log.splitlines():
        if m := JOEY_SPLIT.search(line):
            split = m.group(1)
        elif (m := JOEY_GENERATION.search(line)) and split is not None:
            generation[split] = float(m.group(1))
    n_test = len((data / "test.src").read_text(encoding="utf-8").splitlines())
    bleu = JOEY_BLEU.findall(log)
    result.update(
        train_tokens_per_s=median_after_first(samples),
        train_tokens_per_s_samples=samples,
        parameters=int(params.group(1)) if params else None,
        decode_sentences=n_test,
        decode_seconds=generation.get("test"),
        decode_sentences_per_s=n_test / generation["test"] if generation.get("test") else None,
        joeynmt_reported_bleu=float(bleu[-1]) if bleu else None,
    )
    hyps = model_dir / "best.hyps.test"
    if not hyps.is_file():
        result["error"] = f"JoeyNMT wrote no {hyps}; see {out}"
        return result
    result.update(score_outputs(hyps.read_text(encoding="utf-8").splitlines(), data / "test.tgt"))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_decode-qkv":
        decode_qkv(argv[1:])
        return 0
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = prepare_corpus(args)
    results: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "definitions": {
            "train_tokens_per_s": "target tokens (EOS included, padding excluded) per second of training time, "
            "validation excluded; median over log intervals after the first",
            "decode_sentences_per_s": f"test sentences per second of beam-{args.beam} search, model loading excluded",
        },
    }
    if not args.skip_qkv:
        print("training and decoding with qkv ...", flush=True)
        results["qkv"] = run_qkv(args, data)
    if not args.skip_joeynmt:
        print("training and decoding with JoeyNMT ...", flush=True)
        results["joeynmt"] = run_joeynmt(args, data)
    q, j = results.get("qkv", {}), results.get("joeynmt", {})
    for key in ("train_tokens_per_s", "decode_sentences_per_s"):
        if q.get(key) and j.get(key):
            results.setdefault("qkv_over_joeynmt", {})[key] = q[key] / j[key]
    path = args.json or args.workdir / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for name in ("qkv", "joeynmt"):
        r = results.get(name)
        if r is None:
            continue
        if r.get("error"):
            print(f"{name:8} failed: {r['error'][-500:]}")
            continue
        print(
            f"{name:8} train {r.get('train_tokens_per_s') or float('nan'):>10.0f} tokens/s   "
            f"beam-{args.beam} decode {r.get('decode_sentences_per_s') or float('nan'):>8.1f} sentences/s   "
            f"test BLEU {r.get('test_bleu', float('nan')):.2f} chrF {r.get('test_chrf', float('nan')):.2f} "
            f"exact {r.get('test_exact_match', float('nan')):.1f}%   {r.get('parameters')} parameters"
        )
    print(f"wrote {path}")
    return 0 if all(not results.get(n, {}).get("error") for n in ("qkv", "joeynmt")) else 1


if __name__ == "__main__":
    sys.exit(main())
