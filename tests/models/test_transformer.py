"""TransformerSeq2Seq: cached decoding equals teacher forcing, the Seq2SeqModel interface, training, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qkv.models import TransformerConfig, TransformerSeq2Seq
from qkv.models.interface import DecoderState, EncoderOutput, Seq2SeqModel
from qkv.nn import MultiHeadAttention

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
PAD, BOS, EOS = 0, 1, 2


def make_model(**overrides: object) -> TransformerSeq2Seq:
    args: dict[str, object] = {
        "src_vocab_size": 13,
        "tgt_vocab_size": 11,
        "d_model": 16,
        "num_heads": 4,
        "encoder_layers": 2,
        "decoder_layers": 2,
        "ffn_dim": 32,
        "dropout": 0.0,
        "max_positions": 16,
    }
    args.update(overrides)
    torch.manual_seed(0)
    return TransformerSeq2Seq(TransformerConfig(**args))  # type: ignore[arg-type]


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    src = torch.randint(3, 13, (3, 6), generator=g)
    src_lengths = torch.tensor([6, 4, 1])
    src[1, 4:], src[2, 1:] = PAD, PAD
    tgt = torch.randint(3, 11, (3, 5), generator=g)
    tgt[:, 0] = BOS
    return src, src_lengths, tgt


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary"])
@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_decoding_equals_teacher_forcing(positional: str, kv_heads: int, norm_first: bool) -> None:
    model = make_model(positional=positional, kv_heads=kv_heads, norm_first=norm_first).double().eval()
    src, src_lengths, tgt = batch()
    full = model(src, src_lengths, tgt, need_attention=True)
    assert full.logits.shape == (3, 5, 11)
    assert full.cross_attention.shape == (3, 2, 4, 5, 6)
    assert full.self_attention.shape == (3, 2, 4, 5, 5)

    enc = model.encode(src, src_lengths)
    state = model.start_state(enc)
    for t in range(5):
        step = model.decode_step(tgt[:, t : t + 1], enc, state, need_attention=True)
        assert state.position == t + 1
        assert step.self_attention.shape == (3, 2, 4, 1, t + 1)
        torch.testing.assert_close(step.logits[:, 0], full.logits[:, t], **TOL)
        torch.testing.assert_close(step.cross_attention[:, :, :, 0], full.cross_attention[:, :, :, t], **TOL)
        torch.testing.assert_close(step.self_attention[..., 0, :], full.self_attention[..., t, : t + 1], **TOL)
    assert all(c.seq_len == 5 for c in state.self_caches)
    assert all(c.seq_len == 6 for c in state.cross_caches)  # the source, projected once


def test_decoding_in_chunks_equals_teacher_forcing() -> None:
    model = make_model(positional="rotary", kv_heads=1).double().eval()
    src, src_lengths, tgt = batch()
    full = model(src, src_lengths, tgt).logits
    enc = model.encode(src, src_lengths)
    state = model.start_state(enc)
    pieces = [model.decode_step(tgt[:, a:b], enc, state).logits for a, b in ((0, 2), (2, 3), (3, 5))]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)


def test_source_padding_does_not_change_the_output() -> None:
    model = make_model().double().eval()
    src, src_lengths, tgt = batch()
    noisy = src.clone()
    noisy[1, 4:], noisy[2, 1:] = 7, 9  # garbage after the lengths
    wider = torch.cat([noisy, torch.full((3, 3), 5)], dim=1)
    expected = model(src, src_lengths, tgt).logits
    torch.testing.assert_close(model(noisy, src_lengths, tgt).logits, expected, **TOL)
    torch.testing.assert_close(model(wider, src_lengths, tgt).logits, expected, **TOL)
    cross = model(wider, src_lengths, tgt, need_attention=True).cross_attention
    assert (cross[2, ..., 1:] == 0).all()


def test_implements_the_seq2seq_interface_and_reorders() -> None:
    model = make_model(kv_heads=2).double().eval()
    assert isinstance(model, Seq2SeqModel)
    assert (model.pad_id, model.bos_id, model.eos_id) == (PAD, BOS, EOS)
    src, src_lengths, tgt = batch()
    enc = model.encode(src, src_lengths, need_attention=True)
    assert isinstance(enc, EncoderOutput) and enc.memory.shape == (3, 6, 16)
    assert enc.self_attention.shape == (3, 2, 4, 6, 6)
    state = model.start_state(enc)
    assert isinstance(state, DecoderState)

    model.decode_step(tgt[:, :2], enc, state)
    order = torch.tensor([2, 0, 0, 1])  # beam-style: rows repeat and move
    state.reorder(order)
    enc_r = enc.reorder(order)
    got = model.decode_step(tgt[order, 2:], enc_r, state).logits
    expected = model(src[order], src_lengths[order], tgt[order]).logits[:, 2:]
    torch.testing.assert_close(got, expected, **TOL)


def test_tied_and_shared_embeddings() -> None:
    tied = make_model(src_vocab_size=11, shared_vocab=True)
    assert tied.decoder.output_projection.weight is tied.decoder.embed_tokens.weight
    assert tied.encoder.embed_tokens.weight is tied.decoder.embed_tokens.weight
    untied = make_model(tie_embeddings=False)
    assert untied.decoder.output_projection.weight is not untied.decoder.embed_tokens.weight
    names = [name for name, _ in tied.named_parameters()]
    assert "decoder.output_projection.weight" not in names and "decoder.embed_tokens.weight" not in names
    src, src_lengths, tgt = batch()
    tied(src.clamp(max=10), src_lengths, tgt).logits.sum().backward()
    assert tied.encoder.embed_tokens.weight.grad.abs().sum() > 0


def test_initialization_is_xavier_with_zero_biases() -> None:
    """Every linear weight but the output projection has Xavier's variance 2 / (fan_in + fan_out); biases are
    zero; embeddings and an untied output projection have variance 1 / E. A variance estimated from n weights
    is within 4·√(2/n) of the truth but for a 1e-4 chance; nn.Linear's default is at most 5/6 of Xavier's here."""
    model = make_model(d_model=64, ffn_dim=256, tie_embeddings=False)
    linears = [(n, m.weight, m.bias) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    linears = [(n, w, b) for n, w, b in linears if not n.endswith("in_proj")]
    for name, m in model.named_modules():  # the fused q/k/v projections, each with its own fan
        if isinstance(m, MultiHeadAttention):
            linears += [(f"{name}.{p}", *m.projection_weights()[p]) for p in "qkv"]
    assert len(linears) == 2 * 6 + 2 * 10 + 1  # encoder 4 attention + 2 FFN, decoder 8 + 2, output
    for name, weight, bias in linears:
        fan_out, fan_in = weight.shape
        expected = 1 / 64 if name == "decoder.output_projection" else 2 / (fan_in + fan_out)
        tolerance = 4 * (2 / weight.numel()) ** 0.5
        assert weight.var().item() == pytest.approx(expected, rel=tolerance), name
        if bias is not None:
            assert torch.count_nonzero(bias) == 0, name
    for embed in (model.encoder.embed_tokens, model.decoder.embed_tokens):
        assert embed.weight.var().item() == pytest.approx(1 / 64, rel=4 * (2 / embed.weight.numel()) ** 0.5)


def expected_parameter_count(c: TransformerConfig) -> int:
    """Counted by hand from the architecture."""
    e, f = c.d_model, c.ffn_dim
    kv = (c.kv_heads or c.num_heads) * (e // c.num_heads)
    attention = 2 * (e * e + e) + 2 * (e * kv + kv)  # q, out; k, v
    feed_forward = e * f + f + f * e + e
    norm = 2 * e
    count = c.encoder_layers * (attention + feed_forward + 2 * norm)
    count += c.decoder_layers * (2 * attention + feed_forward + 3 * norm)
    count += c.src_vocab_size * e if not c.shared_vocab else 0
    count += c.tgt_vocab_size * e
    count += 0 if c.tie_embeddings else c.tgt_vocab_size * e
    count += 2 * c.max_positions * e if c.positional == "learned" else 0
    count += 2 * norm if c.norm_first else 0
    return count


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"positional": "learned", "norm_first": True, "kv_heads": 2},
        {"tie_embeddings": False, "positional": "rotary", "kv_heads": 1},
        {"shared_vocab": True, "src_vocab_size": 11},
    ],
)
def test_parameter_count_matches_the_formula(overrides: dict[str, object]) -> None:
    model = make_model(**overrides)
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(model.config)


def reverse_task(n: int, max_len: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``src`` of random lengths and ``tgt = [BOS] + reversed(src) + [EOS]``, both padded."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (n,), generator=g)
    src = torch.full((n, max_len), PAD)
    tgt = torch.full((n, max_len + 2), PAD)
    tgt[:, 0] = BOS
    for i, length in enumerate(lengths.tolist()):
        src[i, :length] = torch.randint(3, vocab, (length,), generator=g)
        tgt[i, 1 : length + 1] = src[i, :length].flip(0)
        tgt[i, length + 1] = EOS
    return src, lengths, tgt


def greedy_decode(model: TransformerSeq2Seq, src: torch.Tensor, src_lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """The simplest search: feed the argmax back, one cached step at a time."""
    enc = model.encode(src, src_lengths)
    state = model.start_state(enc)
    token = torch.full((src.shape[0], 1), model.bos_id)
    out = []
    for _ in range(steps):
        token = model.decode_step(token, enc, state).logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    "positional, norm_first, kv_heads", [("sinusoidal", False, 4), ("rotary", True, 2)], ids=["post-LN", "pre-LN"]
)
def test_learns_to_reverse(positional: str, norm_first: bool, kv_heads: int) -> None:
    src, src_lengths, tgt = reverse_task(32, 6, 12, seed=0)
    model = make_model(
        src_vocab_size=12,
        tgt_vocab_size=12,
        d_model=32,
        ffn_dim=64,
        positional=positional,
        norm_first=norm_first,
        kv_heads=kv_heads,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, labels = tgt[:, :-1], tgt[:, 1:]
    losses = []
    for _ in range(110):
        logits = model(src, src_lengths, inputs).logits
        loss = F.cross_entropy(logits.reshape(-1, 12), labels.reshape(-1), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 50

    model.eval()
    with torch.no_grad():
        predicted = greedy_decode(model, src, src_lengths, labels.shape[1])
    real = labels != PAD
    assert (predicted == labels)[real].float().mean().item() == 1.0


def test_learned_positions_refuse_long_sequences_while_the_others_extend() -> None:
    src = torch.randint(3, 13, (2, 20))
    lengths = torch.tensor([20, 20])
    tgt = torch.randint(3, 11, (2, 20))
    model = make_model(positional="learned")
    with pytest.raises(ValueError, match=r"src reaches length 20, beyond max_positions=16"):
        model.encode(src, lengths)
    with pytest.raises(ValueError, match=r"target reaches length 20, beyond max_positions=16"):
        model(src[:, :8], torch.tensor([8, 8]), tgt)
    enc = model.encode(src[:, :8], torch.tensor([8, 8]))
    state = model.start_state(enc)
    model.decode_step(tgt[:, :16], enc, state)
    with pytest.raises(ValueError, match=r"length 17, beyond max_positions=16"):
        model.decode_step(tgt[:, 16:17], enc, state)
    for positional in ("sinusoidal", "rotary"):
        assert make_model(positional=positional)(src, lengths, tgt).logits.shape == (2, 20, 11)


def test_bad_inputs_are_named() -> None:
    model = make_model()
    src, src_lengths, tgt = batch()
    with pytest.raises(ValueError, match=r"src is an empty batch \(B=0"):
        model.encode(src[:0], src_lengths[:0])
    with pytest.raises(ValueError, match=r"tgt is an empty batch"):
        model(src, src_lengths, tgt[:0])
    with pytest.raises(ValueError, match=r"src_lengths must lie in \[1, 6\].*from 1 to 7"):
        model.encode(src, torch.tensor([7, 4, 1]))
    with pytest.raises(ValueError, match=r"src_lengths must lie in \[1, 6\].*from 0 to 6"):
        model.encode(src, torch.tensor([6, 0, 1]))
    with pytest.raises(ValueError, match=r"src_lengths has shape \(2,\); expected \(B,\) = \(3,\)"):
        model.encode(src, src_lengths[:2])
    bad = tgt.clone()
    bad[0, 1] = 11
    with pytest.raises(ValueError, match=r"tgt holds ids from 1 to 11; expected ids in \[0, tgt_vocab_size=11\)"):
        model(src, src_lengths, bad)
    with pytest.raises(TypeError, match="integer token ids"):
        model.encode(src.float(), src_lengths)
    enc = model.encode(src, src_lengths)
    with pytest.raises(ValueError, match="tokens has batch size 2 but encoder_out has 3"):
        model.decode_step(tgt[:2, :1], enc, model.start_state(enc))
    with pytest.raises(TypeError, match="state must be a TransformerDecoderState"):
        model.decode_step(tgt[:, :1], enc, object())  # type: ignore[arg-type]
