"""TransformerLM: cached decoding equals the full forward, sampling, generation, training, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qkv.models import LMConfig, TransformerLM, sample_next

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def make_lm(**overrides: object) -> TransformerLM:
    args: dict[str, object] = {
        "vocab_size": 12,
        "d_model": 16,
        "num_heads": 4,
        "num_layers": 2,
        "ffn_dim": 32,
        "dropout": 0.0,
        "max_positions": 16,
    }
    args.update(overrides)
    torch.manual_seed(0)
    return TransformerLM(LMConfig(**args))  # type: ignore[arg-type]


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """GPT-2's 0.02 init makes every logit nearly equal; larger weights make the comparisons bite."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("positional", ["sinusoidal", "learned", "rotary"])
@pytest.mark.parametrize("kv_heads", [4, 1])
@pytest.mark.parametrize("norm_first", [True, False])
def test_cached_decoding_equals_the_full_forward(positional: str, kv_heads: int, norm_first: bool) -> None:
    lm = randomize(make_lm(positional=positional, kv_heads=kv_heads, norm_first=norm_first).double()).eval()
    tokens = torch.randint(0, 12, (3, 7), generator=torch.Generator().manual_seed(0))
    logits = lm(tokens)
    whole = lm.decode_step(tokens, lm.start_state(), need_attention=True)
    torch.testing.assert_close(whole.logits, logits, **TOL)
    assert whole.self_attention.shape == (3, 2, 4, 7, 7)
    assert whole.cross_attention is None

    state = lm.start_state()
    for t in range(7):
        step = lm.decode_step(tokens[:, t : t + 1], state, need_attention=True)
        torch.testing.assert_close(step.logits[:, 0], logits[:, t], **TOL)
        torch.testing.assert_close(step.self_attention[..., 0, :], whole.self_attention[..., t, : t + 1], **TOL)
    assert state.position == 7 and all(cache.seq_len == 7 for cache in state.caches)


def test_lengths_only_change_padded_positions() -> None:
    lm = randomize(make_lm().double()).eval()
    tokens = torch.randint(0, 12, (2, 6), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([6, 3])
    plain, padded = lm(tokens), lm(tokens, lengths)
    torch.testing.assert_close(padded[0], plain[0], **TOL)
    torch.testing.assert_close(padded[1, :3], plain[1, :3], **TOL)
    assert not torch.allclose(padded[1, 3:], plain[1, 3:])


def test_greedy_generation_equals_argmax_of_the_full_forward() -> None:
    lm = randomize(make_lm(positional="rotary", kv_heads=2).double()).eval()
    prompt = torch.randint(0, 12, (2, 3), generator=torch.Generator().manual_seed(2))
    out = lm.generate(prompt, 6, temperature=0)
    expected = prompt
    for _ in range(6):  # no cache: re-run the whole sequence each time
        expected = torch.cat([expected, lm(expected)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, expected)
    assert torch.equal(lm.generate(prompt, 0), prompt)


def test_sampling_is_reproducible_and_top_k_1_is_greedy() -> None:
    lm = randomize(make_lm()).eval()
    prompt = torch.randint(0, 12, (4, 2), generator=torch.Generator().manual_seed(3))
    a = lm.generate(prompt, 8, generator=torch.Generator().manual_seed(7))
    b = lm.generate(prompt, 8, generator=torch.Generator().manual_seed(7))
    c = lm.generate(prompt, 8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = lm.generate(prompt, 8, temperature=0)
    assert torch.equal(lm.generate(prompt, 8, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    assert torch.equal(lm.generate(prompt, 8, top_p=1e-6, generator=torch.Generator().manual_seed(0)), greedy)


def draw(logits: torch.Tensor, n: int = 20000, **kwargs: object) -> torch.Tensor:
    """Empirical frequencies of ``n`` draws of :func:`sample_next` from one row of ``logits``."""
    g = torch.Generator().manual_seed(0)
    samples = sample_next(logits.expand(n, -1), generator=g, **kwargs)  # type: ignore[arg-type]
    return torch.bincount(samples, minlength=logits.shape[-1]).double() / n


def test_sample_next_follows_temperature_top_k_and_top_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=F64)
    logits = probs.log()[None, :]
    torch.testing.assert_close(draw(logits), probs, atol=0.015, rtol=0)
    sharp = (logits / 0.5).softmax(-1)[0]
    torch.testing.assert_close(draw(logits, temperature=0.5), sharp, atol=0.015, rtol=0)
    two = torch.tensor([0.625, 0.375, 0, 0], dtype=F64)
    torch.testing.assert_close(draw(logits, top_k=2), two, atol=0.015, rtol=0)
    # top_p=0.7: 0.5 < 0.7, so the nucleus needs the 0.3 token too, and nothing else
    torch.testing.assert_close(draw(logits, top_p=0.7), two, atol=0.015, rtol=0)
    nucleus = torch.cat([probs[:3] / 0.95, torch.zeros(1, dtype=F64)])  # 0.8 < 0.81: three tokens
    torch.testing.assert_close(draw(logits, top_p=0.81), nucleus, atol=0.015, rtol=0)
    greedy = sample_next(torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]]), temperature=0)
    assert torch.equal(greedy, torch.tensor([1, 0]))


def test_eos_ends_rows_with_padding() -> None:
    lm = randomize(make_lm(pad_id=0)).eval()
    prompt = torch.randint(1, 12, (3, 2), generator=torch.Generator().manual_seed(4))
    free = lm.generate(prompt, 10, temperature=0)
    eos = int(free[0, 3])  # row 0's second new token
    expected, ends = free.clone(), []
    for row in range(3):
        new = free[row, 2:].tolist()
        if eos in new:
            end = 2 + new.index(eos)
            expected[row, end + 1 :] = 0
            ends.append(end)
    length = max(ends) + 1 if len(ends) == 3 else 12
    out = lm.generate(prompt, 10, temperature=0, eos_id=eos)
    assert torch.equal(out, expected[:, :length])
    assert (out[0, 4:] == 0).all()


def test_eos_stops_generation_when_every_row_has_ended() -> None:
    lm = randomize(make_lm()).eval()
    prompt = torch.randint(1, 12, (1, 2), generator=torch.Generator().manual_seed(5))
    free = lm.generate(prompt, 10, temperature=0)
    eos = int(free[0, 4])
    end = free[0, 2:].tolist().index(eos) + 2
    out = lm.generate(prompt, 10, temperature=0, eos_id=eos)
    assert torch.equal(out, free[:, : end + 1])


def expected_parameter_count(c: LMConfig) -> int:
    e, f = c.d_model, c.ffn_dim
    kv = (c.kv_heads or c.num_heads) * (e // c.num_heads)
    attention = 2 * (e * e + e) + 2 * (e * kv + kv)
    layer = attention + (e * f + f + f * e + e) + 2 * (2 * e)
    count = c.num_layers * layer + c.vocab_size * e
    count += c.max_positions * e if c.positional == "learned" else 0
    count += 2 * e if c.norm_first else 0
    count += 0 if c.tie_embeddings else c.vocab_size * e
    return count


@pytest.mark.parametrize(
    "overrides", [{}, {"tie_embeddings": False, "kv_heads": 2}, {"positional": "rotary", "norm_first": False}]
)
def test_parameter_count_matches_the_formula(overrides: dict[str, object]) -> None:
    lm = make_lm(**overrides)
    assert sum(p.numel() for p in lm.parameters()) == expected_parameter_count(lm.config)
    assert (lm.lm_head.weight is lm.embed_tokens.weight) == lm.config.tie_embeddings


def copy_task(n: int, length: int, seed: int) -> torch.Tensor:
    """``x SEP x`` rows: ``x`` random over ids 2..11, ``SEP = 1``."""
    x = torch.randint(2, 12, (n, length), generator=torch.Generator().manual_seed(seed))
    return torch.cat([x, torch.ones(n, 1, dtype=torch.long), x], dim=1)


@pytest.mark.parametrize(
    "positional, norm_first, steps", [("learned", True, 110), ("sinusoidal", False, 150)], ids=["pre-LN", "post-LN"]
)
def test_learns_to_copy(positional: str, norm_first: bool, steps: int) -> None:
    seq = copy_task(32, 5, seed=0)
    lm = make_lm(d_model=32, ffn_dim=64, positional=positional, norm_first=norm_first)
    optimizer = torch.optim.Adam(lm.parameters(), lr=3e-3)
    inputs, labels = seq[:, :-1], seq[:, 1:].clone()
    labels[:, :5] = -100  # the first half is random: only the copy is learnable
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(lm(inputs).reshape(-1, 12), labels.reshape(-1), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 50
    out = lm.eval().generate(seq[:, :6], 5, temperature=0)
    assert (out[:, 6:] == seq[:, 6:]).float().mean().item() == 1.0


def test_positional_range_and_bad_arguments() -> None:
    lm = make_lm(positional="learned").eval()
    prompt = torch.randint(0, 12, (2, 10))
    with pytest.raises(ValueError, match=r"tokens reaches length 17, beyond max_positions=16"):
        lm(torch.randint(0, 12, (2, 17)))
    with pytest.raises(ValueError, match=r"prompt \+ max_new_tokens - 1 reaches length 17, beyond max_positions=16"):
        lm.generate(prompt, 8)
    assert lm.generate(prompt, 7, temperature=0).shape == (2, 17)
    for positional in ("sinusoidal", "rotary"):
        assert make_lm(positional=positional)(torch.randint(0, 12, (1, 40))).shape == (1, 40, 12)

    with pytest.raises(ValueError, match=r"tokens is an empty batch \(B=0"):
        lm(torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="prompt is an empty batch"):
        lm.generate(torch.zeros(0, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        lm.generate(prompt[:, :2], 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k must be a positive int or None; got 0"):
        lm.generate(prompt[:, :2], 2, top_k=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\] or None; got 1.5"):
        lm.generate(prompt[:, :2], 2, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0; got -1"):
        lm.generate(prompt[:, :2], -1)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 10\]"):
        lm(prompt, torch.tensor([11, 3]))
    state = lm.start_state()
    lm.decode_step(prompt, state)
    with pytest.raises(ValueError, match="tokens has batch size 1 but the state holds 2"):
        lm.decode_step(prompt[:1, :1], state)


@pytest.mark.parametrize("positional", ["learned", "rotary"])
def test_sliding_window_limits_what_a_token_sees_in_forward_and_cached_decoding(positional: str) -> None:
    lm = randomize(make_lm(positional=positional, num_layers=1, window=3, kv_heads=2).double()).eval()
    tokens = torch.randint(0, 12, (2, 10), generator=torch.Generator().manual_seed(6))
    logits = lm(tokens)
    # One layer: position 8 sees positions 5..8 only.
    far, near = tokens.clone(), tokens.clone()
    far[:, 4] = (far[:, 4] + 1) % 12
    near[:, 5] = (near[:, 5] + 1) % 12
    torch.testing.assert_close(lm(far)[:, 8], logits[:, 8], **TOL)
    assert not torch.allclose(lm(near)[:, 8], logits[:, 8])
    state = lm.start_state()
    for t in range(10):
        step = lm.decode_step(tokens[:, t : t + 1], state, need_attention=True)
        torch.testing.assert_close(step.logits[:, 0], logits[:, t], **TOL)
        assert (step.self_attention[..., : max(t - 3, 0)] == 0).all()
    unwindowed = randomize(make_lm(positional=positional, num_layers=1, kv_heads=2).double()).eval()
    unwindowed.load_state_dict(lm.state_dict())
    assert not torch.allclose(unwindowed(tokens)[:, 8], logits[:, 8])


def test_window_must_be_a_positive_int() -> None:
    with pytest.raises(ValueError, match="window must be an int >= 1; got 0"):
        make_lm(window=0)


def test_stream_yields_the_tokens_generate_appends_one_step_at_a_time() -> None:
    lm = randomize(make_lm(positional="rotary")).eval()
    prompt = torch.randint(0, 12, (2, 3), generator=torch.Generator().manual_seed(9))
    whole = lm.generate(prompt, 6, generator=torch.Generator().manual_seed(1))
    steps = lm.stream(prompt, 6, generator=torch.Generator().manual_seed(1))
    first = next(steps)
    assert first.shape == (2,) and torch.equal(first, whole[:, 3])
    assert torch.equal(torch.stack([first, *steps], dim=1), whole[:, 3:])
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        lm.stream(prompt, -2)
