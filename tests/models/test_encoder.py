"""TransformerEncoder (BERT-style): padding invariance, outputs on request, BERT names, training, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qkv.models import EncoderConfig, TransformerEncoder, mean_pool
from qkv.models.encoder import bert_to_qkv_state_dict, qkv_to_bert_state_dict

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def make_encoder(**overrides: object) -> TransformerEncoder:
    args: dict[str, object] = {
        "vocab_size": 20,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 32,
        "max_position_embeddings": 12,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    args.update(overrides)
    torch.manual_seed(0)
    model = TransformerEncoder(EncoderConfig(**args))  # type: ignore[arg-type]
    with torch.no_grad():  # BERT's 0.02 init makes every token look alike; larger weights make tests bite
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.double().eval()


def padded_batch() -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(0)
    lengths = [7, 4, 1]
    ids = torch.randint(1, 20, (3, 7), generator=g)
    mask = torch.arange(7) < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask.long(), lengths


def test_padding_gives_the_hidden_states_of_the_unpadded_input() -> None:
    model = make_encoder()
    ids, mask, lengths = padded_batch()
    types = (torch.arange(7) >= 2).long().expand(3, 7)
    by_mask = model(ids, mask, token_type_ids=types, need_attention=True)
    by_lengths = model(ids, lengths=torch.tensor(lengths), token_type_ids=types)
    for b, n in enumerate(lengths):
        alone = model(ids[b : b + 1, :n], token_type_ids=types[b : b + 1, :n]).last_hidden_state[0]
        torch.testing.assert_close(by_mask.last_hidden_state[b, :n], alone, **TOL)
        torch.testing.assert_close(by_lengths.last_hidden_state[b, :n], alone, **TOL)
        assert (by_mask.attentions[b, ..., n:] == 0).all()
    unmasked = model(ids, token_type_ids=types).last_hidden_state
    assert not torch.allclose(unmasked[1, :4], by_mask.last_hidden_state[1, :4])


def test_outputs_on_request() -> None:
    model = make_encoder()
    ids, mask, _ = padded_batch()
    plain = model(ids, mask)
    assert plain.last_hidden_state.shape == (3, 7, 16)
    assert plain.hidden_states is None and plain.attentions is None
    full = model(ids, mask, need_attention=True, need_hidden_states=True)
    assert full.attentions.shape == (3, 2, 4, 7, 7)
    assert full.hidden_states.shape == (3, 3, 7, 16)
    torch.testing.assert_close(full.hidden_states[:, -1], plain.last_hidden_state, **TOL)
    torch.testing.assert_close(full.attentions.sum(-1), torch.ones(3, 2, 4, 7, dtype=F64), **TOL)
    # the embeddings' output: LayerNorm(word + position + type)
    emb = model.embeddings
    x = emb.word_embeddings(ids) + emb.position_embeddings.weight[:7] + emb.token_type_embeddings.weight[0]
    torch.testing.assert_close(full.hidden_states[:, 0], emb.LayerNorm(x), **TOL)


def test_token_types_matter_and_default_to_zero() -> None:
    model = make_encoder()
    ids, mask, _ = padded_batch()
    default = model(ids, mask).last_hidden_state
    torch.testing.assert_close(model(ids, mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state, default)
    assert not torch.allclose(model(ids, mask, token_type_ids=torch.ones_like(ids)).last_hidden_state, default)


def test_mean_pool_averages_real_tokens() -> None:
    hidden = torch.randn(3, 4, 5, dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]])
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1, :2].mean(0))
    assert (pooled[2] == 0).all()
    torch.testing.assert_close(mean_pool(hidden), hidden.mean(1))


def test_parameter_names_map_to_bert() -> None:
    model = make_encoder()
    names = set(model.state_dict())
    for name in (
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
    ):
        assert name in names
    bert = qkv_to_bert_state_dict(model.state_dict())
    assert len(bert) == len(names) + 2 * 2 * model.config.num_hidden_layers  # in_proj → query, key, value
    for suffix in (
        "attention.self.query.weight",
        "attention.self.key.bias",
        "attention.self.value.weight",
        "attention.output.dense.weight",
        "attention.output.LayerNorm.weight",
        "intermediate.dense.weight",
        "output.dense.bias",
        "output.LayerNorm.bias",
    ):
        assert f"encoder.layer.1.{suffix}" in bert
    assert bert["encoder.layer.0.intermediate.dense.weight"].shape == (32, 16)  # BERT's (out, in) layout

    prefixed = {f"bert.{k}": v for k, v in bert.items()}
    prefixed["bert.pooler.dense.weight"] = torch.zeros(16, 16)
    prefixed["bert.embeddings.position_ids"] = torch.arange(12)[None]
    fresh = make_encoder()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(bert_to_qkv_state_dict(prefixed))
    ids, mask, _ = padded_batch()
    torch.testing.assert_close(fresh(ids, mask).last_hidden_state, model(ids, mask).last_hidden_state, **TOL)
    with pytest.raises(ValueError, match="cls.predictions.bias"):
        bert_to_qkv_state_dict({**bert, "cls.predictions.bias": torch.zeros(20)})


def expected_parameter_count(c: EncoderConfig) -> int:
    e, f = c.hidden_size, c.intermediate_size
    layer = 4 * (e * e + e) + (e * f + f) + (f * e + e) + 2 * (2 * e)
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * e + 2 * e
    return embeddings + c.num_hidden_layers * layer


def test_parameter_count_matches_the_formula() -> None:
    model = make_encoder(type_vocab_size=3, num_hidden_layers=3)
    assert sum(p.numel() for p in model.parameters()) == expected_parameter_count(model.config)


def test_learns_to_reverse() -> None:
    torch.manual_seed(0)
    x = torch.randint(1, 12, (32, 6), generator=torch.Generator().manual_seed(0))
    model = TransformerEncoder(
        EncoderConfig(
            vocab_size=12,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            max_position_embeddings=8,
        )
    )
    head = torch.nn.Linear(32, 12)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=3e-3)
    losses = []
    for _ in range(90):
        logits = head(model(x).last_hidden_state)
        loss = F.cross_entropy(logits.reshape(-1, 12), x.flip(1).reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 50
    model.eval()
    with torch.no_grad():
        predicted = head(model(x).last_hidden_state).argmax(-1)
    assert (predicted == x.flip(1)).float().mean().item() == 1.0


def test_bad_inputs_are_named() -> None:
    model = make_encoder()
    ids, mask, _ = padded_batch()
    with pytest.raises(ValueError, match=r"input_ids is an empty batch \(B=0"):
        model(ids[:0])
    with pytest.raises(ValueError, match=r"input_ids reaches length 13, beyond max_positions=12"):
        model(torch.ones(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask or lengths, not both"):
        model(ids, mask, lengths=torch.tensor([7, 4, 1]))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 6\); expected \(B, L\) = \(3, 7\)"):
        model(ids, mask[:, :6])
    with pytest.raises(ValueError, match="attention_mask must hold 0"):
        model(ids, mask * 2)
    types = torch.full_like(ids, 2)
    types[:, 0] = 0
    with pytest.raises(ValueError, match=r"token_type_ids holds ids from 0 to 2; .* \[0, type_vocab_size=2\)"):
        model(ids, token_type_ids=types)
