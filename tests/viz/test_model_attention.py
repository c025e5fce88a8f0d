"""Named attention maps of each model kind: shapes, labels, the causal zeros, and the weights against an oracle
that takes another path through the model (KV-cached decoding, one token at a time)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qkv.models import (
    LMConfig,
    RNNConfig,
    RNNSeq2Seq,
    TransformerConfig,
    TransformerLM,
    TransformerSeq2Seq,
    greedy_search,
)
from qkv.viz.model_attention import BOS_LABEL, lm_attention, seq2seq_attention

V = 12
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm() -> TransformerLM:
    torch.manual_seed(0)
    config = LMConfig(vocab_size=V, d_model=16, num_heads=2, num_layers=2, ffn_dim=32, max_positions=16, dropout=0.0)
    return TransformerLM(config).eval()


@pytest.fixture(scope="module")
def seq2seq() -> TransformerSeq2Seq:
    torch.manual_seed(0)
    config = TransformerConfig(
        src_vocab_size=V,
        tgt_vocab_size=V,
        d_model=16,
        num_heads=2,
        encoder_layers=2,
        decoder_layers=3,
        ffn_dim=32,
        dropout=0.0,
    )
    return TransformerSeq2Seq(config).eval()


def test_lm_attention_is_causal_and_equals_cached_decoding(lm) -> None:
    ids = [4, 5, 6, 7, 8]
    amap = lm_attention(lm, ids, list("abcde"))
    assert (amap.name, amap.causal, amap.same_tokens) == ("self", True, True)
    assert amap.weights.shape == (2, 2, 5, 5) and amap.tokens == amap.key_tokens == list("abcde")
    assert (amap.weights[..., np.triu_indices(5, k=1)[0], np.triu_indices(5, k=1)[1]] == 0).all()
    np.testing.assert_allclose(amap.weights.sum(axis=-1), 1.0, atol=1e-6)
    # Oracle: feed one token at a time through the KV cache; step t's row is row t of the full map.
    state = lm.start_state()
    with torch.no_grad():
        for t, token in enumerate(ids):
            out = lm.decode_step(torch.tensor([[token]]), state, need_attention=True)
            np.testing.assert_allclose(amap.weights[:, :, t, : t + 1], out.self_attention[0, :, :, 0], atol=1e-6)


def test_seq2seq_maps_match_what_greedy_search_saw(seq2seq) -> None:
    src = torch.tensor([[4, 5, 6, 7]])
    (hyp,) = greedy_search(
        seq2seq, src, torch.tensor([4]), max_len_cap=6, need_attention=True, need_self_attention=True
    )
    out_ids = hyp.tokens + ([seq2seq.eos_id] if hyp.finished else [])
    out_tokens = [f"y{i}" for i in range(len(out_ids))]
    encoder, decoder, cross = seq2seq_attention(seq2seq, [4, 5, 6, 7], out_ids, list("abcd"), out_tokens)
    t = len(out_ids)
    assert [m.name for m in (encoder, decoder, cross)] == ["encoder", "decoder", "cross"]
    assert encoder.weights.shape == (2, 2, 4, 4) and encoder.tokens == encoder.key_tokens == list("abcd")
    assert decoder.weights.shape == (3, 2, t, t) and decoder.causal and not decoder.same_tokens
    assert decoder.tokens == out_tokens and decoder.key_tokens == [BOS_LABEL, *out_tokens[:-1]]
    assert (decoder.weights * np.triu(np.ones((t, t)), k=1) == 0).all()
    assert cross.weights.shape == (3, 2, t, 4) and (cross.tokens, cross.key_tokens) == (out_tokens, list("abcd"))
    # Teacher-forced, all steps at once, equals the cached search one step at a time.
    np.testing.assert_allclose(cross.weights, hyp.cross_attention.double().numpy(), atol=1e-5)
    np.testing.assert_allclose(decoder.weights, hyp.self_attention.double().numpy(), atol=1e-5)


def test_rnn_has_cross_attention_only() -> None:
    torch.manual_seed(0)
    rnn = RNNSeq2Seq(RNNConfig(src_vocab_size=V, tgt_vocab_size=V, embed_dim=8, hidden_dim=8)).eval()
    (cross,) = seq2seq_attention(rnn, [4, 5, 6], [7, 8, 2], list("abc"), ["x", "y", "</s>"])
    assert (cross.name, cross.label, cross.weights.shape) == ("cross", "cross-attention", (1, 1, 3, 3))
    expected = rnn(torch.tensor([[4, 5, 6]]), torch.tensor([3]), torch.tensor([[1, 7, 8]]), need_attention=True)
    np.testing.assert_allclose(cross.weights, expected.cross_attention[0].detach().double().numpy(), atol=1e-6)


def test_labels_must_match_the_ids(lm, seq2seq) -> None:
    with pytest.raises(ValueError, match="3 ids but 2 token labels"):
        lm_attention(lm, [4, 5, 6], ["a", "b"])
    with pytest.raises(ValueError, match="2 target ids with 1 labels"):
        seq2seq_attention(seq2seq, [4], [5, 2], ["a"], ["x"])
    with pytest.raises(ValueError, match="the source has 0 and the target 1 tokens"):
        seq2seq_attention(seq2seq, [], [2], [], ["</s>"])
