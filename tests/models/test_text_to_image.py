"""The text-to-image DiT: its config and prompt checks, the cross-attention it returns, guidance, the prompt
encoded once per sampling, and saving / loading through qkv.models.checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qkv.checks import ConfigError
from qkv.models.checkpoint import load_model, save_model
from qkv.models.diffusion import GuidedVelocity
from qkv.models.prompt_encoder import encode_prompts
from qkv.models.text_to_image import TextToImageConfig, TextToImageModel
from qkv.nn import KVCache

WORDS = ["a", "red", "blue", "circle", "square", "left", "of"]


def tiny(**overrides: object) -> TextToImageConfig:
    values: dict[str, object] = {
        "vocabulary": WORDS, "image_size": 8, "patch_size": 2, "d_model": 16, "num_layers": 2, "num_heads": 2,
        "ffn_dim": 32, "text_layers": 1, "max_prompt_words": 8,
    }  # fmt: skip
    values.update(overrides)
    return TextToImageConfig(**values)  # type: ignore[arg-type]


def trained_looking(config: TextToImageConfig, seed: int = 0) -> TextToImageModel:
    """A model with every weight random (the zero-initialized adaLN and output layers too), so that the
    velocity depends on everything."""
    torch.manual_seed(seed)
    model = TextToImageModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def noise(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image_size": 10, "patch_size": 4}, "image_size=10 must be a multiple of patch_size=4"),
        ({"num_heads": 3}, "d_model=16 must be a multiple of num_heads=3"),
        ({"d_model": 18, "num_heads": 2}, "d_model must be divisible by 4"),
        ({"vocabulary": ["a", "a"]}, "vocabulary must be a non-empty list of distinct lower-case words"),
        ({"vocabulary": ["Red"]}, "vocabulary must be a non-empty list of distinct lower-case words"),
        ({"vocabulary": ["left of"]}, "vocabulary must be a non-empty list of distinct lower-case words"),
        ({"text_layers": -1}, "text_layers must be an int >= 0; got -1"),
        ({"text_attention": "sideways"}, "text_attention must be one of"),
        ({"time_shift": 0}, "time_shift must be"),
    ],
)
def test_bad_configs_name_the_field(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides)


def test_prompts_become_padded_ids_of_the_vocabulary() -> None:
    tokens, lengths = encode_prompts(["A red circle", "a blue square left of a red circle"], WORDS, 8)
    assert lengths.tolist() == [3, 8]
    assert tokens.tolist() == [[0, 1, 3, 0, 0, 0, 0, 0], [0, 2, 4, 5, 6, 0, 1, 3]]


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("", "prompt must be a non-empty string; got ''"),
        ("   ", "prompt must be a non-empty string"),
        ("a purple circle", r"word\(s\) outside the model's vocabulary: 'purple'; the model knows: a red blue circle"),
        ("a red circle left of a red circle square", "has 9 words; the model takes at most 8"),
    ],
)
def test_bad_prompts_are_clear_errors(prompt: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        encode_prompts([prompt], WORDS, 8)


def test_a_new_model_predicts_a_blank_image_adaln_zero() -> None:
    model = TextToImageModel(tiny()).eval()
    memory, lengths = model.encode_prompts(["a red circle"])
    x_t = noise(1)
    out = model.denoise(x_t, torch.tensor([0.5]), memory, lengths)
    torch.testing.assert_close(out.velocity, x_t / 0.5)  # the velocity of the image prediction 0


def test_cross_attention_has_the_patch_grid_and_sums_to_one_over_the_prompt() -> None:
    model = trained_looking(tiny())
    memory, lengths = model.encode_prompts(["a red circle", "a blue square left of a red circle"])
    assert memory.shape == (2, 9, 16) and lengths.tolist() == [4, 9]  # the start token, then the words
    out = model.denoise(noise(2), torch.tensor([0.3, 0.8]), memory, lengths, need_attention=True)
    weights = out.cross_attention
    assert weights is not None and weights.shape == (2, 2, 2, 16, 9)  # (B, layers, heads, 4x4 patches, 1 + words)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 2, 2, 16))
    assert not weights[0, ..., 4:].any()  # the first prompt has 3 words: the rest is padding
    assert (weights[1] > 0).all()


def test_guidance_one_is_the_conditional_prediction_exactly_and_other_scales_mix() -> None:
    model = trained_looking(tiny())
    memory, lengths = model.encode_prompts(["a red circle left of a blue square"])
    x, t = noise(1), torch.tensor([0.6])
    conditional = model.denoise(x, t, memory, lengths).velocity
    assert torch.equal(GuidedVelocity(model, memory, lengths, 1.0)(x, t), conditional)
    null, null_lengths = model.unconditional(1)
    unconditional = model.denoise(x, t, null, null_lengths).velocity
    assert not torch.allclose(conditional, unconditional, atol=1e-3)
    mixed = GuidedVelocity(model, memory, lengths, 2.5)(x, t)
    torch.testing.assert_close(mixed, unconditional + 2.5 * (conditional - unconditional), atol=1e-5, rtol=1e-4)


def test_dropped_prompts_keep_the_start_token_only() -> None:
    model = trained_looking(tiny())
    tokens, lengths = encode_prompts(["a red circle", "a blue square"], WORDS, 8)
    memory, keys = model.condition(tokens, lengths, torch.tensor([False, True]))
    null, null_keys = model.unconditional(1, 4)
    assert keys.tolist() == [4, 1] and null_keys.tolist() == [1]
    torch.testing.assert_close(memory[:, 0], null[0, :1].expand(2, -1))  # key 0: the start token
    x, t = noise(2), torch.tensor([0.5, 0.5])
    dropped = model.denoise(x[1:], t[1:], memory[1:], keys[1:]).velocity
    torch.testing.assert_close(dropped, model.denoise(x[1:], t[1:], null, null_keys).velocity)


@pytest.mark.parametrize(
    "direction, changed",
    [
        ("causal", [False, False, True, True]),  # word 1 changed: it and the words after it see it
        ("anticausal", [False, True, True, False]),  # it and the words before it (key 0, the start token, never)
        ("bidirectional", [False, True, True, True]),
    ],
)
def test_the_text_attention_direction_decides_which_words_see_a_word(direction: str, changed: list[bool]) -> None:
    model = trained_looking(tiny(text_attention=direction))
    first, _ = model.encode_prompts(["a red circle"])
    second, _ = model.encode_prompts(["a blue circle"])
    assert [not torch.allclose(first[0, i], second[0, i]) for i in range(4)] == changed


@pytest.mark.parametrize(
    "direction, pooled_key",
    [("causal", lambda n: n - 1), ("anticausal", lambda n: min(n, 2) - 1), ("bidirectional", None)],
)
def test_the_pooled_prompt_is_the_key_that_read_the_whole_prompt_or_the_mean(
    direction: str, pooled_key: object
) -> None:
    model = trained_looking(tiny(text_attention=direction, pooled_text=True))
    memory, keys = model.encode_prompts(["a red circle left of a blue square", "a circle"])
    pooled = model.pool(memory, keys)
    for row, n in enumerate(keys.tolist()):
        want = memory[row, :n].mean(0) if pooled_key is None else memory[row, pooled_key(n)]  # type: ignore[operator]
        torch.testing.assert_close(pooled[row], want)
    null, null_keys = model.unconditional(1, memory.shape[1])
    torch.testing.assert_close(model.pool(null, null_keys)[0], null[0, 0])  # the null prompt pools to its start token
    x, t = noise(2), torch.tensor([0.7, 0.7])
    with_pool = model.denoise(x, t, memory, keys).velocity
    assert model.text_pool is not None
    with torch.no_grad():
        model.text_pool.weight.zero_(), model.text_pool.bias.zero_()
    assert not torch.allclose(with_pool, model.denoise(x, t, memory, keys).velocity)  # the pooled prompt is read


def test_generate_follows_the_model_time_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    model = trained_looking(tiny(time_shift=3.0))
    seen: list[float] = []
    denoise = model.denoise

    def spy(x_t: torch.Tensor, t: torch.Tensor, *args: object, **kwargs: object) -> object:
        seen.append(float(t[0]))
        return denoise(x_t, t, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(model, "denoise", spy)
    model.generate(["a red circle"], noise(1), steps=2, guidance=1.0)
    assert seen == pytest.approx([1.0, 0.75])


def test_generate_encodes_the_prompt_once_and_projects_its_keys_once(monkeypatch: pytest.MonkeyPatch) -> None:
    model = trained_looking(tiny())
    calls = {"text": 0, "keys": 0, "denoise": 0}
    model.text_encoder.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    model.blocks[0].register_forward_hook(lambda *_: calls.__setitem__("denoise", calls["denoise"] + 1))
    update = KVCache.update

    def counted(cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls["keys"] += 1  # a static cache is updated only when keys and values were projected
        return update(cache, k, v)

    monkeypatch.setattr(KVCache, "update", counted)
    out = model.generate(["a red circle", "a blue square"], noise(2), steps=5, guidance=3.0, need_attention=True)
    assert calls == {"text": 1, "keys": 2, "denoise": 5}  # keys: once per block
    assert out.images.shape == (2, 3, 8, 8)
    assert out.cross_attention is not None and out.cross_attention.shape == (2, 2, 2, 16, 3)  # the words only
    sums = out.cross_attention.sum(dim=-1)  # the start token takes the rest
    assert ((sums > 0) & (sums < 1)).all()


def test_generate_is_deterministic_in_its_noise_and_follows_the_prompt() -> None:
    model = trained_looking(tiny())
    first = model.generate(["a red circle"], noise(1), steps=3, guidance=2.0).images
    again = model.generate(["a red circle"], noise(1), steps=3, guidance=2.0).images
    other = model.generate(["a blue square"], noise(1), steps=3, guidance=2.0).images
    assert torch.equal(first, again) and not torch.allclose(first, other)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0, "guidance": 1.0}, "steps must be an int >= 1; got 0"),
        ({"steps": 2, "guidance": -1.0}, "guidance must be a number >= 0; got -1.0"),
    ],
)
def test_generate_checks_steps_and_guidance(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TextToImageModel(tiny()).generate(["a red circle"], noise(1), **kwargs)  # type: ignore[arg-type]


def test_save_and_load_keep_the_vocabulary_and_the_function(tmp_path: Path) -> None:
    model = trained_looking(tiny())
    save_model(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "text_to_image" and saved["vocabulary"] == WORDS
    loaded = load_model(tmp_path)
    assert isinstance(loaded, TextToImageModel)
    a = model.generate(["a red circle left of a blue square"], noise(1), steps=2, guidance=2.0).images
    b = loaded.generate(["a red circle left of a blue square"], noise(1), steps=2, guidance=2.0).images
    assert torch.equal(a, b)
