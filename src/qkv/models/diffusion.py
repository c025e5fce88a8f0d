"""Rectified flow (flow matching on straight paths): the training pairs, the loss, the Euler sampler and
classifier-free guidance, for any model that predicts a velocity.

An image ``x0`` and Gaussian noise ``ε`` are joined by the straight path ``x_t = (1 - t)·x0 + t·ε``,
``t ∈ [0, 1]`` (``t = 0``: the image, ``t = 1``: pure noise). Along it the velocity is constant,
``dx_t/dt = ε - x0``; the model learns it by regression (Liu et al., 2022; Lipman et al., 2022)::

    t = sigmoid(0.8 + 0.8 * randn(B))  # logit-normal times, leaning to the noise
    x_t = interpolate(x0, noise, t)  # (B, C, H, W)
    v = (x_t - model(x_t, t)) / t  # the model predicts the image; its velocity follows
    loss = ((v - (noise - x0)) ** 2).mean(dim=(1, 2, 3))  # per image

Sampling integrates the learned velocity from ``t = 1`` (noise) to ``t = 0`` with ``steps`` Euler steps on a
uniform grid: ``x ← x + (t_next - t)·v(x, t)``. Were the prediction exact, every step would land on the
path itself (the path is straight), so the error to ``x0`` shrinks by ``(t - t_next)/t`` each step.

Classifier-free guidance (Ho & Salimans, 2022) mixes the conditional and unconditional predictions:
``v = v_uncond + g·(v_cond - v_uncond)``; ``g = 1`` is the conditional prediction exactly (the unconditional
pass is then skipped), ``g = 0`` the unconditional one, ``g > 1`` pushes away from the unconditional.

The network predicts the clean image and the velocity is computed from it (``x``-prediction with a velocity
loss, Li & He 2025, "Back to Basics"; ``t`` clamped at :data:`MIN_TIME` in the division): a velocity carries
the noise, which a network whose width is close to a patch's 48 values would otherwise have to pass through
itself, while an image of flat-coloured shapes is a simple thing to predict. Together with JiT's times
(:func:`logit_normal_times`), on a 4-layer, width-64 model trained for 3,000 steps, this took the share of
generated test images the scene checker judges right from 7% (velocity prediction, times ``sigmoid(randn)``)
to 39%.

Where an image's layout is decided, and the time shift (:func:`shift_times`, SD3's): flat shapes of a few
pixels survive a lot of noise, so by ``t = 0.8`` a noisy scene already shows where its objects are, and a
sampler that starts at ``t = 1`` commits to a layout within its first steps. A model that seldom trains above
``t = 0.9`` (0.4% of the unshifted times are above 0.95) learns to read the layout from the noise and
ignores the words that should set it ("left of", "above"): on a model trained without the shift, the same
32 noises gave the same layouts for "left of" and "right of". Shifting the times toward the noise, in
training and in the sampler's grid alike, fixes that; shifting every training time starves the fine detail
decided near the image (circles drawn as squares), so the demo shifts 80% of them
(``training.shifted_times``).

Why a flow and not DDPM/DDIM: one loss with no noise schedule to tune, a sampler of a few lines whose steps
follow a straight line (so a few dozen Euler steps suffice for a small model, which matters on a CPU),
and the same guidance formula.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from qkv.checks import int_at_least, non_negative_number
from qkv.nn import KVCache

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``velocity(x_t (B, C, H, W), t (B,)) -> (B, C, H, W)``: a model's prediction of ``noise - x0``."""


def _times_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t (B,)`` shaped to broadcast over ``x (B, ...)``."""
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must have shape (B,) = ({x.shape[0]},) to match x {tuple(x.shape)}; got {tuple(t.shape)}")
    return t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The point at time ``t`` of the straight path from ``x0`` to ``noise``: ``(1 - t)·x0 + t·noise``.

    Args:
        x0: ``(B, C, H, W)`` images.
        noise: ``(B, C, H, W)`` Gaussian noise.
        t: ``(B,)`` times in ``[0, 1]``.
    Returns:
        ``x_t (B, C, H, W)``.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)} but noise {tuple(noise.shape)}; they must be equal")
    s = _times_like(t, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity of the path, what the model learns to predict: ``noise - x0``, ``(B, C, H, W)``."""
    return noise - x0


TIME_MEAN, TIME_STD = 0.8, 0.8  # logit-normal training times, leaning to the noisy end (JiT's, in this t)
MIN_TIME = 0.05  # an image prediction becomes a velocity (x_t - x0) / t with t at least this


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Times moved toward the noise: ``shift·t / (1 + (shift - 1)·t)`` (SD3's timestep shift, Esser et al. 2024);
    0 and 1 stay, ``shift = 1`` is the identity, ``shift = 3`` maps 0.5 to 0.75 and 0.9 to 0.96."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def logit_normal_times(normal: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
    """Training times ``sigmoid(TIME_MEAN + TIME_STD·n)`` of standard normal draws ``n``, shifted by ``shift``
    (:func:`shift_times`): in ``(0, 1)``, more of them noisy (``t > 0.5``: 84% unshifted), where the layout is
    decided, than clean (Li & He, 2025, JiT)."""
    return shift_times(torch.sigmoid(TIME_MEAN + TIME_STD * normal), shift)


def velocity_from_image(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The velocity an image prediction ``x0 (B, C, H, W)`` implies at ``x_t``: ``(x_t - x0) / max(t, MIN_TIME)``."""
    return (x_t - x0) / _times_like(t, x_t).clamp_min(MIN_TIME)


def flow_loss(predicted: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The per-image mean squared error of a predicted velocity: ``(B,)``.

    Args:
        predicted: ``(B, C, H, W)`` the model's velocity at ``interpolate(x0, noise, t)``.
        x0, noise: ``(B, C, H, W)``.
    """
    error = predicted.float() - velocity_target(x0, noise).float()
    return error.pow(2).flatten(1).mean(dim=1)


def check_sampling(steps: object, guidance: object) -> tuple[int, float]:
    """``(steps, guidance)`` if ``steps`` is an int >= 1 and ``guidance`` a number >= 0, else ``ConfigError``."""
    return int_at_least("steps", steps), non_negative_number("guidance", guidance)


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """The ``steps + 1`` times of the Euler sampler, from 1 (noise) down to 0 (the image): uniform, then shifted
    by ``shift`` (:func:`shift_times`; more steps near the noise), float64."""
    steps = int_at_least("steps", steps)
    return shift_times(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift)


def euler_step(x: torch.Tensor, t: float, t_next: float, velocity: torch.Tensor) -> torch.Tensor:
    """One Euler step of ``dx/dt = velocity`` from ``t`` to ``t_next`` (``t_next < t``): ``(B, C, H, W)``."""
    return x + (t_next - t) * velocity


def guide(v_cond: torch.Tensor, v_uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """Classifier-free guidance ``v_uncond + guidance·(v_cond - v_uncond)``; ``v_cond`` itself (the same
    tensor) when ``guidance == 1``, when no unconditional prediction was made (``v_uncond`` None, which is
    only allowed then)."""
    if guidance == 1.0:
        return v_cond
    if v_uncond is None:
        raise ValueError(f"guidance {guidance} needs the unconditional prediction; got v_uncond=None")
    return v_uncond + guidance * (v_cond - v_uncond)


def sample(velocity: Velocity, noise: torch.Tensor, steps: int, shift: float = 1.0) -> torch.Tensor:
    """Integrate ``velocity`` from ``noise`` (``t = 1``) to an image (``t = 0``) in ``steps`` Euler steps.

    Args:
        velocity: the (guided) velocity function, called ``steps`` times.
        noise: ``(B, C, H, W)`` the starting point.
        steps: Euler steps, >= 1.
        shift: the time grid's shift (:func:`time_grid`), the one the model was trained with.
    Returns:
        ``(B, C, H, W)`` the sample (not clamped).
    """
    grid = time_grid(steps, shift).tolist()
    x = noise
    for i in range(steps):
        t, t_next = grid[i], grid[i + 1]
        times = torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)
        x = euler_step(x, t, t_next, velocity(x, times))
    return x


@dataclass
class DenoiserOutput:
    """``velocity (B, C, H, W)``; with ``need_attention``, ``cross_attention (B, layers, heads, N, S)`` over the
    ``S`` keys of the prompts."""

    velocity: torch.Tensor
    cross_attention: torch.Tensor | None


class PromptDenoiser(Protocol):
    """A velocity model conditioned on encoded prompts (:class:`~qkv.models.text_to_image.TextToImageModel`)."""

    def denoise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        memory: torch.Tensor,
        memory_lengths: torch.Tensor,
        *,
        need_attention: bool = False,
        caches: list[KVCache] | None = None,
    ) -> DenoiserOutput: ...

    def unconditional(self, batch: int, length: int = 1) -> tuple[torch.Tensor, torch.Tensor]: ...

    def new_caches(self) -> list[KVCache]: ...


class GuidedVelocity:
    """The guided velocity :func:`sample` integrates, for prompts encoded once: ``memory (B, S, E)``,
    ``lengths (B,)``.

    With ``guidance != 1`` each call runs one batch of ``2B`` rows, the prompts' and the null prompt's (padded
    to ``S`` keys, masked); with 1 only the prompts'. The cross-attention's keys and values are projected on
    the first call and reused by the next (the model's static caches). With ``need_attention``,
    ``attention`` sums the prompts' rows' cross-attention ``(B, layers, heads, N, S)`` over the calls.
    """

    def __init__(
        self,
        model: PromptDenoiser,
        memory: torch.Tensor,
        lengths: torch.Tensor,
        guidance: float,
        *,
        need_attention: bool = False,
    ) -> None:
        self.model, self.guidance, self.need_attention = model, guidance, need_attention
        self.batch = memory.shape[0]
        if guidance != 1.0:
            null, null_lengths = model.unconditional(self.batch, memory.shape[1])
            memory, lengths = torch.cat([memory, null.to(memory.dtype)]), torch.cat([lengths, null_lengths])
        self.memory, self.lengths = memory, lengths
        self.caches = model.new_caches()
        self.attention: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x (B, C, H, W)``, ``t (B,)`` → the guided velocity ``(B, C, H, W)``."""
        guided = self.guidance != 1.0
        out = self.model.denoise(
            torch.cat([x, x]) if guided else x,
            torch.cat([t, t]) if guided else t,
            self.memory,
            self.lengths,
            need_attention=self.need_attention,
            caches=self.caches,
        )
        if out.cross_attention is not None:
            weights = out.cross_attention[: self.batch].float()
            self.attention = weights if self.attention is None else self.attention + weights
        v_cond = out.velocity[: self.batch]
        return guide(v_cond, out.velocity[self.batch :] if guided else None, self.guidance)
