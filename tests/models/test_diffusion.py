"""Rectified flow: the path, its velocity, the Euler sampler and classifier-free guidance, checked against the
formulas written out here, and one denoising step of a tiny trained model."""

from __future__ import annotations

import pytest
import torch

from qkv.checks import ConfigError
from qkv.models.diffusion import (
    check_sampling,
    euler_step,
    flow_loss,
    guide,
    interpolate,
    logit_normal_times,
    sample,
    shift_times,
    time_grid,
    velocity_from_image,
    velocity_target,
)
from qkv.models.text_to_image import TextToImageConfig, TextToImageModel


def fixed(seed: int, shape: tuple[int, ...] = (2, 3, 4, 4)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_the_path_joins_the_image_to_the_noise_with_a_constant_velocity() -> None:
    x0, noise = fixed(0), fixed(1)
    t = torch.tensor([0.25, 0.8])
    expected = torch.stack([0.75 * x0[0] + 0.25 * noise[0], 0.2 * x0[1] + 0.8 * noise[1]])
    torch.testing.assert_close(interpolate(x0, noise, t), expected)
    torch.testing.assert_close(interpolate(x0, noise, torch.zeros(2)), x0)
    torch.testing.assert_close(interpolate(x0, noise, torch.ones(2)), noise)
    h = 1e-3  # d x_t / dt, by finite differences, is noise - x0 at any t
    slope = (interpolate(x0, noise, t + h) - interpolate(x0, noise, t - h)) / (2 * h)
    torch.testing.assert_close(slope, velocity_target(x0, noise), atol=1e-3, rtol=1e-3)


def test_an_euler_step_with_the_exact_velocity_lands_on_the_path_closer_to_the_image() -> None:
    x0, noise = fixed(0), fixed(1)
    x_t = interpolate(x0, noise, torch.full((2,), 0.8))
    x_next = euler_step(x_t, 0.8, 0.6, velocity_target(x0, noise))
    torch.testing.assert_close(x_next, interpolate(x0, noise, torch.full((2,), 0.6)))
    before, after = (x_t - x0).norm(), (x_next - x0).norm()
    assert float(after / before) == pytest.approx(0.6 / 0.8, rel=1e-5)


@pytest.mark.parametrize("steps", [1, 3, 20])
def test_sampling_an_exact_velocity_recovers_the_image_in_any_number_of_steps(steps: int) -> None:
    x0, noise = fixed(0), fixed(1)
    times: list[float] = []

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        times.append(float(t[0]))
        assert t.shape == (2,)
        return velocity_target(x0, noise)

    torch.testing.assert_close(sample(velocity, noise, steps), x0, atol=1e-5, rtol=1e-5)
    assert times == pytest.approx(time_grid(steps)[:-1].tolist())
    assert times[0] == 1.0 and len(times) == steps


def test_shifted_times_keep_the_ends_and_move_the_middle_toward_the_noise() -> None:
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert shift_times(t, 1.0) is t
    shifted = shift_times(t, 3.0)
    torch.testing.assert_close(shifted, 3 * t / (1 + 2 * t))
    assert shifted[0] == 0 and shifted[-1] == 1
    assert bool((shifted[1:-1] > t[1:-1]).all()) and bool((shifted.diff() > 0).all())
    assert float(shift_times(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)


@pytest.mark.parametrize("steps", [1, 4])
def test_a_shifted_sampler_visits_the_shifted_grid_and_still_recovers_the_image(steps: int) -> None:
    x0, noise = fixed(0), fixed(1)
    times: list[float] = []

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        times.append(float(t[0]))
        return velocity_target(x0, noise)

    torch.testing.assert_close(sample(velocity, noise, steps, shift=3.0), x0, atol=1e-5, rtol=1e-5)
    uniform = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
    assert times == pytest.approx((3 * uniform / (1 + 2 * uniform)).tolist())


def test_shifted_training_times_lean_further_to_the_noise() -> None:
    normal = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    plain, shifted = logit_normal_times(normal), logit_normal_times(normal, 3.0)
    torch.testing.assert_close(shifted, 3 * plain / (1 + 2 * plain))
    assert float((shifted > 0.9).float().mean()) > 3 * float((plain > 0.9).float().mean())


def test_an_exact_image_prediction_gives_the_exact_velocity() -> None:
    x0, noise = fixed(0), fixed(1)
    t = torch.tensor([0.3, 0.9])
    torch.testing.assert_close(velocity_from_image(interpolate(x0, noise, t), x0, t), velocity_target(x0, noise))
    tiny = torch.tensor([0.01, 0.0])  # t is clamped at 0.05 in the division: no blow-up near the image
    torch.testing.assert_close(velocity_from_image(noise, x0, tiny), (noise - x0) / 0.05)


def test_training_times_are_logit_normal_leaning_to_the_noise() -> None:
    t = logit_normal_times(torch.randn(100_000, generator=torch.Generator().manual_seed(0)))
    assert ((t > 0) & (t < 1)).all()
    assert float(torch.logit(t).mean()) == pytest.approx(0.8, abs=0.01)
    assert float(torch.logit(t).std()) == pytest.approx(0.8, abs=0.01)
    assert float((t > 0.5).float().mean()) == pytest.approx(0.84, abs=0.01)


def test_guidance_mixes_the_predictions_and_one_is_the_conditional_one_itself() -> None:
    cond, uncond = fixed(2), fixed(3)
    assert guide(cond, uncond, 1.0) is cond
    assert guide(cond, None, 1.0) is cond
    torch.testing.assert_close(guide(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(guide(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    with pytest.raises(ValueError, match="guidance 2.0 needs the unconditional prediction"):
        guide(cond, None, 2.0)


def test_flow_loss_is_the_mean_squared_velocity_error_per_image() -> None:
    x0, noise, predicted = fixed(0), fixed(1), fixed(4)
    expected = ((predicted - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(flow_loss(predicted, x0, noise), expected)


@pytest.mark.parametrize(
    "steps, guidance, message",
    [
        (0, 1.0, "steps must be an int >= 1; got 0"),
        (2.5, 1.0, "steps must be an int >= 1; got 2.5"),
        (10, -0.5, "guidance must be a number >= 0; got -0.5"),
        (10, float("nan"), "guidance must be a number >= 0; got nan"),
    ],
)
def test_bad_sampling_arguments_name_the_argument(steps: object, guidance: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_sampling(steps, guidance)


def test_one_denoising_step_of_a_tiny_trained_model_reduces_the_error_on_a_fixed_input() -> None:
    torch.manual_seed(0)
    config = TextToImageConfig(
        vocabulary=["a", "red", "circle"], image_size=8, patch_size=2, d_model=32, num_layers=1, num_heads=2,
        ffn_dim=64, text_layers=0, max_prompt_words=3,
    )  # fmt: skip
    model = TextToImageModel(config)
    x0 = fixed(5, (1, 3, 8, 8)).clamp(-1, 1)
    noise = fixed(6, (1, 3, 8, 8))
    tokens, lengths = torch.tensor([[0, 1, 2]]), torch.tensor([3])
    times = torch.tensor([0.3, 0.5, 0.7])
    x_t = interpolate(x0.expand(3, -1, -1, -1), noise.expand(3, -1, -1, -1), times)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):  # fit the exact target of this one input
        v = model(x_t, times, tokens.expand(3, -1), lengths.expand(3)).velocity
        loss = flow_loss(v, x0.expand(3, -1, -1, -1), noise.expand(3, -1, -1, -1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.05 * losses[0]
    with torch.no_grad():
        v = model(x_t[1:2], times[1:2], tokens, lengths).velocity
    x_next = euler_step(x_t[1:2], 0.5, 0.25, v)
    before, after = float((x_t[1:2] - x0).norm()), float((x_next - x0).norm())
    assert after < 0.6 * before  # the exact velocity would halve it
