"""RNNSeq2Seq: learns copy/reverse; cached decode_step equals teacher forcing; padding; reorder; config; errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from qkv.models.interface import DecoderState, Seq2SeqModel
from qkv.models.rnn import RNNConfig, RNNDecoderState, RNNSeq2Seq
from qkv.models.search import greedy_search

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}
PAD, BOS, EOS = 0, 1, 2
VOCAB = 12  # 3 special ids and 9 symbols


def make_model(
    cell: str = "gru",
    attention: str = "bahdanau",
    *,
    input_feeding: bool = True,
    layers: int = 2,
    seed: int = 0,
) -> RNNSeq2Seq:
    """A float64 model in eval mode with weights large enough for sharp, position-dependent attention."""
    torch.manual_seed(seed)
    config = RNNConfig(
        VOCAB,
        VOCAB + 1,
        embed_dim=6,
        hidden_dim=8,
        layers=layers,
        cell=cell,
        attention=attention,
        input_feeding=input_feeding,
    )
    model = RNNSeq2Seq(config).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.7)
    return model


def random_batch(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``src (B, max(lengths))`` of symbols padded with PAD, and ``src_lengths``."""
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), PAD)
    for b, n in enumerate(lengths):
        src[b, :n] = torch.randint(3, VOCAB, (n,), generator=g)
    return src, torch.tensor(lengths)


ALL = [(c, a) for c in ("gru", "lstm") for a in ("bahdanau", "luong_dot", "luong_general")]


def test_implements_the_interface() -> None:
    model = make_model()
    src, lengths = random_batch([3, 2])
    state = model.start_state(model.encode(src, lengths))
    assert isinstance(model, Seq2SeqModel)
    assert isinstance(state, DecoderState) and isinstance(state, RNNDecoderState)
    assert (model.pad_id, model.bos_id, model.eos_id) == (PAD, BOS, EOS)
    assert RNNSeq2Seq.model_type == "rnn"


def copy_task(task: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` random sequences of 1..8 symbols; returns ``src``, ``src_lengths`` and ``tgt`` = BOS, the
    (reversed) copy, EOS, then PAD."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (n,), generator=g)
    src = torch.full((n, 8), PAD)
    tgt = torch.full((n, 10), PAD)
    for b, length in enumerate(lengths.tolist()):
        seq = torch.randint(3, VOCAB, (length,), generator=g)
        src[b, :length] = seq
        out = seq.flip(0) if task == "reverse" else seq
        tgt[b, 0], tgt[b, 1 : length + 1], tgt[b, length + 1] = BOS, out, EOS
    return src, lengths, tgt


@pytest.mark.parametrize(
    "cell, attention, task",
    [("gru", "bahdanau", "reverse"), ("lstm", "luong_general", "copy"), ("lstm", "luong_dot", "reverse")],
)
def test_overfits_copy_and_reverse(cell: str, attention: str, task: str) -> None:
    torch.manual_seed(0)
    config = RNNConfig(VOCAB, VOCAB, embed_dim=16, hidden_dim=48, cell=cell, attention=attention)
    model = RNNSeq2Seq(config)
    src, lengths, tgt = copy_task(task, 48)
    inputs, targets = tgt[:, :-1], tgt[:, 1:]
    real = targets != PAD
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    accuracy = 0.0
    for step in range(300):
        logits = model(src, lengths, inputs).logits
        loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 9:
            accuracy = ((logits.argmax(-1) == targets) & real).sum().item() / real.sum().item()
            if accuracy == 1.0:
                break
    assert accuracy == 1.0, f"token accuracy {accuracy:.3f} after {step + 1} steps"
    # All teacher-forced argmaxes right => greedy decoding reproduces every target exactly.
    for b, hyp in enumerate(greedy_search(model, src, lengths)):
        n = int(lengths[b])
        assert hyp.finished and hyp.tokens == targets[b, :n].tolist()


@pytest.mark.parametrize("cell, attention", ALL)
@pytest.mark.parametrize("input_feeding", [True, False])
def test_decode_step_equals_teacher_forcing(cell: str, attention: str, input_feeding: bool) -> None:
    model = make_model(cell, attention, input_feeding=input_feeding)
    src, lengths = random_batch([5, 3, 4])
    tgt = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(2))
    tgt[:, 0] = BOS
    full = model(src, lengths, tgt, need_attention=True)
    assert full.logits.shape == (3, 6, VOCAB + 1)
    assert full.cross_attention is not None and full.cross_attention.shape == (3, 1, 1, 6, 5)
    for chunks in ([1] * 6, [2, 1, 3]):
        encoder_out = model.encode(src, lengths)
        state = model.start_state(encoder_out)
        logits, weights, start = [], [], 0
        for size in chunks:
            out = model.decode_step(tgt[:, start : start + size], encoder_out, state, need_attention=True)
            assert out.cross_attention is not None and out.cross_attention.shape == (3, 1, 1, size, 5)
            logits.append(out.logits)
            weights.append(out.cross_attention)
            start += size
        assert state.steps == 6
        torch.testing.assert_close(torch.cat(logits, dim=1), full.logits, **TOL)
        torch.testing.assert_close(torch.cat(weights, dim=3), full.cross_attention, **TOL)


@pytest.mark.parametrize("cell, attention", [("gru", "bahdanau"), ("lstm", "luong_general"), ("gru", "luong_dot")])
def test_padded_batch_equals_each_sentence_alone(cell: str, attention: str) -> None:
    model = make_model(cell, attention)
    src, lengths = random_batch([2, 6, 4])
    tgt_lengths = [5, 3, 4]
    tgt = torch.full((3, 5), PAD)
    for b, n in enumerate(tgt_lengths):
        tgt[b, 0] = BOS
        tgt[b, 1:n] = torch.randint(3, VOCAB, (n - 1,), generator=torch.Generator().manual_seed(b))
    batched = model(src, lengths, tgt, need_attention=True)
    assert batched.cross_attention is not None
    for b, (n_src, n_tgt) in enumerate(zip(lengths.tolist(), tgt_lengths, strict=True)):
        alone = model(src[b : b + 1, :n_src], lengths[b : b + 1], tgt[b : b + 1, :n_tgt], need_attention=True)
        assert alone.cross_attention is not None
        torch.testing.assert_close(batched.logits[b, :n_tgt], alone.logits[0], **TOL)
        weights = batched.cross_attention[b, 0, 0, :n_tgt]
        torch.testing.assert_close(weights[:, :n_src], alone.cross_attention[0, 0, 0], **TOL)
        assert torch.all(weights[:, n_src:] == 0), "attention on padding"
    memory = model.encode(src, lengths).memory
    assert torch.all(memory[0, 2:] == 0) and torch.all(memory[2, 4:] == 0)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_state_reorder_selects_rows(cell: str) -> None:
    model = make_model(cell, "luong_general")
    src, lengths = random_batch([4, 2, 3])
    tgt = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(3))
    tgt[:, 0] = BOS
    index = torch.tensor([2, 0, 0, 1])
    encoder_out = model.encode(src, lengths)
    state = model.start_state(encoder_out)
    model.decode_step(tgt[:, :3], encoder_out, state)
    state.reorder(index)
    got = model.decode_step(tgt[index, 3:], encoder_out.reorder(index), state, need_attention=True)
    want = model(src[index], lengths[index], tgt[index], need_attention=True)
    assert want.cross_attention is not None and got.cross_attention is not None
    torch.testing.assert_close(got.logits, want.logits[:, 3:], **TOL)
    torch.testing.assert_close(got.cross_attention, want.cross_attention[:, :, :, 3:], **TOL)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, B=4\)"):
        state.reorder(torch.tensor([4]))
    with pytest.raises(ValueError, match="1-D integer tensor"):
        state.reorder(torch.tensor([0.0]))


def test_config_dict_round_trip_and_unknown_keys() -> None:
    config = RNNConfig(20, 30, embed_dim=8, hidden_dim=16, layers=2, cell="lstm", attention="luong_dot", dropout=0.1)
    values = json.loads(json.dumps(config.to_dict()))
    assert RNNConfig.from_dict(values) == config
    with pytest.raises(ValueError, match=r"unknown RNNConfig key\(s\): 'heads', 'colour'; valid keys: src_vocab_size"):
        RNNConfig.from_dict({**values, "heads": 4, "colour": "red"})
    with pytest.raises(ValueError, match=r"RNNConfig needs key\(s\) 'tgt_vocab_size'"):
        RNNConfig.from_dict({"src_vocab_size": 10})


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"cell": "rnn"}, "cell must be one of 'gru', 'lstm'; got 'rnn'"),
        ({"attention": "dot"}, "attention must be one of"),
        ({"hidden_dim": 7}, "hidden_dim must be even"),
        ({"layers": 0}, "layers must be an int >= 1; got 0"),
        ({"dropout": 1.0}, r"dropout must be a probability in \[0, 1\); got 1.0"),
        ({"eos_id": 40}, r"eos_id=40 must be < tgt_vocab_size=30"),
        ({"bos_id": 0}, "must differ"),
    ],
)
def test_config_rejects_bad_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RNNConfig(**{"src_vocab_size": 20, "tgt_vocab_size": 30, **changes})  # type: ignore[arg-type]


def test_save_and_load_with_safetensors(tmp_path: object) -> None:
    model = make_model("lstm", "bahdanau")
    save_file(model.state_dict(), f"{tmp_path}/model.safetensors")
    with open(f"{tmp_path}/config.json", "w") as f:
        json.dump({"model_type": model.model_type, **model.config.to_dict()}, f)
    with open(f"{tmp_path}/config.json") as f:
        values = json.load(f)
    assert values.pop("model_type") == "rnn"
    loaded = RNNSeq2Seq(RNNConfig.from_dict(values)).double().eval()
    loaded.load_state_dict(load_file(f"{tmp_path}/model.safetensors"))
    src, lengths = random_batch([3, 2])
    tgt = torch.tensor([[BOS, 4, 5], [BOS, 6, 7]])
    torch.testing.assert_close(loaded(src, lengths, tgt).logits, model(src, lengths, tgt).logits, rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors() -> None:
    model = make_model()
    src, lengths = random_batch([3, 2])
    tgt = torch.tensor([[BOS, 4], [BOS, 5]])
    cases = [
        (torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long), r"src must have shape \(B, T\)"),
        (src, torch.tensor([3, 0]), r"src_lengths must lie in \[1, S=3\]; got values from 0 to 3"),
        (src, torch.tensor([4, 2]), r"src_lengths must lie in \[1, S=3\]; got values from 2 to 4"),
        (src, torch.tensor([3]), r"src_lengths must have shape \(B,\) = \(2,\)"),
        (src, torch.tensor([3.0, 2.0]), "src_lengths must be an integer tensor"),
        (src.float(), lengths, "src must be an integer"),
        (src + VOCAB, lengths, r"src ids must lie in \[0, 12\)"),
    ]
    for bad_src, bad_lengths, message in cases:
        with pytest.raises(ValueError, match=message):
            model(bad_src, bad_lengths, tgt)
    with pytest.raises(ValueError, match=r"tgt must have shape \(B, T\) with B=2"):
        model(src, lengths, tgt[:1])
    encoder_out = model.encode(src, lengths)
    state = model.start_state(encoder_out)
    with pytest.raises(ValueError, match="tokens has batch size 1, the state 2"):
        model.decode_step(tgt[:1], encoder_out, state)
    with pytest.raises(ValueError, match=r"tokens ids must lie in \[0, 13\)"):
        model.decode_step(tgt + 20, encoder_out, state)


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = RNNSeq2Seq(RNNConfig(VOCAB, VOCAB, embed_dim=8, hidden_dim=8, layers=2, dropout=0.5))
    src, lengths = random_batch([3, 2])
    tgt = torch.tensor([[BOS, 4, 5], [BOS, 6, 7]])
    model.train()
    assert not torch.equal(model(src, lengths, tgt).logits, model(src, lengths, tgt).logits)
    model.eval()
    torch.testing.assert_close(model(src, lengths, tgt).logits, model(src, lengths, tgt).logits, rtol=0, atol=0)
