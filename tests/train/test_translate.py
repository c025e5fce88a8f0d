"""decode_sources: sentences batched longest first come back in input order, each as it decodes alone."""

from __future__ import annotations

import pytest
import torch

from qkv.models import TransformerConfig, TransformerSeq2Seq
from qkv.models.interface import EncoderOutput
from qkv.train.translate import decode_sources

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCES = [[5, 6], [7, 8, 9, 10, 11, 12, 13], [3], [14, 15, 16, 4], [9, 9, 9, 9, 9, 9, 9, 9, 9], [10, 3, 12]]


class RecordingModel(TransformerSeq2Seq):
    """A ``TransformerSeq2Seq`` that records the ``src_lengths`` of every batch it encodes."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.batches: list[list[int]] = []

    def encode(self, src: torch.Tensor, src_lengths: torch.Tensor, *, need_attention: bool = False) -> EncoderOutput:
        self.batches.append(src_lengths.tolist())
        return super().encode(src, src_lengths, need_attention=need_attention)


def model() -> RecordingModel:
    torch.manual_seed(3)
    config = TransformerConfig(
        src_vocab_size=17, tgt_vocab_size=13, d_model=16, num_heads=4, encoder_layers=2, decoder_layers=2,
        ffn_dim=32, dropout=0.0, max_positions=64,
    )  # fmt: skip
    return RecordingModel(config).double().eval()


@pytest.mark.parametrize("beam", [1, 3])
def test_batched_sorted_by_length_equals_each_sentence_alone_in_input_order(beam: int) -> None:
    m = model()
    together = decode_sources(m, SOURCES, beam=beam, max_tokens=24)
    # Several batches, of several sentences, each longest first, the longest batch first.
    assert len(m.batches) > 1 and max(len(b) for b in m.batches) > 1
    assert m.batches[0][0] == max(len(s) for s in SOURCES)
    assert all(b == sorted(b, reverse=True) for b in m.batches)
    assert sorted(n for b in m.batches for n in b) == sorted(len(s) for s in SOURCES)

    m.batches.clear()
    alone = [decode_sources(m, [s], beam=beam)[0] for s in SOURCES]
    assert [len(b) for b in m.batches] == [1] * len(SOURCES)
    assert [h.tokens for h in together] == [h.tokens for h in alone]
    for got, expected in zip(together, alone, strict=True):
        assert got.score == pytest.approx(expected.score, rel=1e-9, abs=1e-9)
    # The sentences are told apart: this random model never ends one, so each gets its own length limit.
    assert [len(h.tokens) for h in alone] == [int(1.5 * len(s) + 10) for s in SOURCES]
