"""Decoding speed: sentences per second of greedy and beam search, with and without the decoder cache.

* **cached**: :func:`qkv.models.search.greedy_search` / :func:`~qkv.models.search.beam_search` as they are,
  one new token per row per step through ``decode_step`` (KV caches for the Transformer, the hidden state
  for the RNN).
* **uncached**: the same search code over :class:`Uncached`, a wrapper whose ``decode_step`` re-runs the
  teacher-forced ``forward`` (encoder included) on the whole prefix at every step, as a model without a
  cache must: O(T²) decoder work per sentence instead of O(T) (O(T³) attention for a Transformer).

The model is randomly initialized and EOS is suppressed, so every sentence decodes exactly ``--tgt-len``
steps and the four runs do the same number of steps. The script also checks that cached and uncached
decoding produce the same tokens.

Usage::

    python benchmarks/decoding_speed.py                       # Transformer, default sizes, < 1 min on 2 cores
    python benchmarks/decoding_speed.py --model rnn --sentences 64 --json rnn.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qkv.models.interface import DecoderOutput, EncoderOutput, Seq2SeqModel
from qkv.models.rnn import RNNConfig, RNNSeq2Seq
from qkv.models.search import beam_search, greedy_search


class NoEOS:
    """A :class:`Seq2SeqModel` that never ends a sentence: ``model``'s EOS logit is set to ``-inf``."""

    def __init__(self, model: Seq2SeqModel) -> None:
        self.model = model
        self.pad_id, self.bos_id, self.eos_id = model.pad_id, model.bos_id, model.eos_id

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor, *, need_attention: bool = False) -> EncoderOutput:
        return self.model.encode(src, src_lengths, need_attention=need_attention)

    def start_state(self, encoder_out: EncoderOutput) -> Any:
        return self.model.start_state(encoder_out)

    def decode_step(
        self, tokens: torch.Tensor, encoder_out: EncoderOutput, state: Any, *, need_attention: bool = False
    ) -> DecoderOutput:
        out = self.model.decode_step(tokens, encoder_out, state, need_attention=need_attention)
        out.logits[..., self.eos_id] = -torch.inf
        return out

    def forward(
        self, src: torch.Tensor, src_lengths: torch.Tensor, tgt: torch.Tensor, *, need_attention: bool = False
    ) -> DecoderOutput:
        out = self.model.forward(src, src_lengths, tgt, need_attention=need_attention)
        out.logits[..., self.eos_id] = -torch.inf
        return out


@dataclass
class PrefixState:
    """The decoder inputs so far, ``(B, t)``; all an uncached decoder keeps."""

    prefix: torch.Tensor

    def reorder(self, indices: torch.Tensor) -> None:
        self.prefix = self.prefix.index_select(0, indices)


class Uncached:
    """``model`` with its cache thrown away: each ``decode_step`` is a teacher-forced ``forward`` on the
    source and the whole prefix, of which the last positions are returned."""

    def __init__(self, model: Seq2SeqModel) -> None:
        self.model = model
        self.pad_id, self.bos_id, self.eos_id = model.pad_id, model.bos_id, model.eos_id

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor, *, need_attention: bool = False) -> EncoderOutput:
        # Search reorders EncoderOutput rows with the beams; keeping src in it keeps src aligned too.
        memory = torch.zeros(*src.shape, 1)
        return EncoderOutput(memory=memory, src_lengths=src_lengths, extras={"src": src})

    def start_state(self, encoder_out: EncoderOutput) -> PrefixState:
        return PrefixState(torch.zeros(encoder_out.memory.shape[0], 0, dtype=torch.long))

    def decode_step(
        self, tokens: torch.Tensor, encoder_out: EncoderOutput, state: PrefixState, *, need_attention: bool = False
    ) -> DecoderOutput:
        state.prefix = torch.cat([state.prefix, tokens], dim=1)
        out = self.model.forward(encoder_out.extras["src"], encoder_out.src_lengths, state.prefix)
        return DecoderOutput(logits=out.logits[:, -tokens.shape[1] :])

    def forward(
        self, src: torch.Tensor, src_lengths: torch.Tensor, tgt: torch.Tensor, *, need_attention: bool = False
    ) -> DecoderOutput:
        return self.model.forward(src, src_lengths, tgt, need_attention=need_attention)


def build_model(kind: str, vocab: int, width: int, layers: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "rnn":
        config = RNNConfig(vocab, vocab, embed_dim=width, hidden_dim=width, layers=layers, attention="bahdanau")
        return RNNSeq2Seq(config).eval()
    try:
        from qkv.models.config import TransformerConfig
        from qkv.models.transformer import TransformerSeq2Seq
    except ImportError as error:  # the Transformer is optional for this script
        raise SystemExit(f"--model transformer needs qkv.models.transformer ({error}); use --model rnn") from error
    config = TransformerConfig(
        src_vocab_size=vocab,
        tgt_vocab_size=vocab,
        d_model=width,
        num_heads=max(1, width // 64),
        encoder_layers=layers,
        decoder_layers=layers,
        ffn_dim=4 * width,
        dropout=0.0,
    )
    return TransformerSeq2Seq(config).eval()


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, args.vocab, args.width, args.layers, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    src = torch.randint(3, args.vocab, (args.sentences, args.src_len), generator=g)
    lengths = torch.randint(max(1, args.src_len // 2), args.src_len + 1, (args.sentences,), generator=g)
    lengths[0] = args.src_len
    searches = {
        "greedy": lambda m, s, n: [[h] for h in greedy_search(m, s, n, max_len=args.tgt_len)],
        f"beam {args.beam}": lambda m, s, n: beam_search(m, s, n, beam_size=args.beam, max_len=args.tgt_len),
    }
    variants = {"cached": NoEOS(model), "uncached": Uncached(NoEOS(model))}
    rows, outputs = [], {}
    for search_name, search in searches.items():
        for variant, wrapped in variants.items():
            search(wrapped, src[:2], lengths[:2])  # warm-up
            start = time.perf_counter()
            hyps = []
            for i in range(0, args.sentences, args.batch_size):
                hyps += search(wrapped, src[i : i + args.batch_size], lengths[i : i + args.batch_size])
            seconds = time.perf_counter() - start
            outputs[search_name, variant] = [h[0].tokens for h in hyps]
            rows.append(
                {
                    "search": search_name,
                    "decoder": variant,
                    "seconds": seconds,
                    "sentences_per_s": args.sentences / seconds,
                    "tokens_per_s": args.sentences * args.tgt_len / seconds,
                }
            )
        same = outputs[search_name, "cached"] == outputs[search_name, "uncached"]
        cached, uncached = rows[-2], rows[-1]
        for row in (cached, uncached):
            row["same_output"] = same
            row["speedup_vs_uncached"] = uncached["seconds"] / row["seconds"]
    params = sum(p.numel() for p in model.parameters())
    return {
        "benchmark": "decoding_speed",
        "config": {**vars(args), "parameters": params},
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
        },
        "convention": "sentences/s = sentences / wall time of the whole search (batches of --batch-size); "
        "every sentence decodes exactly --tgt-len steps (EOS suppressed)",
        "results": rows,
    }


def table(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"model={c['model']} params={c['parameters']:,} sentences={c['sentences']} batch={c['batch_size']} "
        f"src_len<={c['src_len']} tgt_len={c['tgt_len']} threads={report['machine']['threads']}",
        "",
        "| search | decoder | seconds | sentences/s | tokens/s | speed-up | same output |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['search']} | {r['decoder']} | {r['seconds']:.2f} | {r['sentences_per_s']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['speedup_vs_uncached']:.1f}× | {'yes' if r['same_output'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("transformer", "rnn"), default="transformer")
    parser.add_argument("--sentences", type=int, default=16, help="sentences decoded per run (default 16)")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per search call (default 16)")
    parser.add_argument("--src-len", type=int, default=20, help="longest source; others from len/2 (default 20)")
    parser.add_argument("--tgt-len", type=int, default=24, help="decoding steps per sentence (default 24)")
    parser.add_argument("--beam", type=int, default=5, help="beam size (default 5)")
    parser.add_argument("--vocab", type=int, default=1000, help="source and target vocabulary (default 1000)")
    parser.add_argument("--width", type=int, default=256, help="d_model / hidden_dim (default 256)")
    parser.add_argument("--layers", type=int, default=3, help="layers of encoder and decoder (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench-results/decoding_speed.json"))
    args = parser.parse_args(argv)
    for name in ("sentences", "batch_size", "src_len", "tgt_len", "beam", "width", "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.vocab < 4:
        parser.error("--vocab must be >= 4 (pad, bos, eos and a word)")
    report = run(args)
    print(table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report["config"]["json"] = str(args.json)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
