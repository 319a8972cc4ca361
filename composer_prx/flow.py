"""The one timestep convention of composer_prx: rectified flow with x-prediction.

    t in [0, 1], t = 0 clean, t = 1 noise
    x_t = (1 - t) * x + t * eps                       (noising)
    v_hat = (x_t - x_hat) / max(t, t_min)             (x-prediction -> velocity, JiT, t_min = 0.05)
    v     = (x_t - x) / max(t, t_min)                 (velocity target, clamped alike; = eps - x for t >= t_min)
    loss  = mean ||v_hat - v||^2 = mean ||x_hat - x||^2 / max(t, t_min)^2

Both sides are clamped, so the loss is an x-loss weighted by 1 / max(t, t_min)^2 and its minimiser
is x_hat = x (E[x | x_t] over data) at every t.  The sampler converts x_hat with the exact ODE
velocity (x_t - x_hat) / t, which needs no clamp since it never evaluates t = 0.

Timesteps are drawn logit-normal, t = sigmoid(mean + std * n), optionally mixed with uniform t,
then moved towards noise by the resolution shift  t' = s t / (1 + (s - 1) t).  Sampling walks the
same shifted grid from t = 1 down to t = 0 with Euler or Heun steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

T_MIN = 0.05


@dataclass(frozen=True)
class TimeSampling:
    """Settings of the training-time t distribution."""

    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0
    uniform_mix: float = 0.0

    def __post_init__(self) -> None:
        if self.std <= 0:
            raise ValueError(f"TimeSampling.std must be > 0, got {self.std}")
        if self.shift <= 0:
            raise ValueError(f"TimeSampling.shift must be > 0, got {self.shift}")
        if not 0.0 <= self.uniform_mix <= 1.0:
            raise ValueError(f"TimeSampling.uniform_mix must be in [0, 1], got {self.uniform_mix}")


def shift_t(t: Tensor, shift: float) -> Tensor:
    """Resolution shift t' = s t / (1 + (s - 1) t); identity at s = 1, monotone, fixes 0 and 1."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_t(
    batch_size: int,
    settings: TimeSampling = TimeSampling(),
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw [B] training timesteps: logit-normal (mixed with uniform), then shifted."""
    normal = torch.randn(batch_size, device=device, generator=generator)
    t = torch.sigmoid(settings.mean + settings.std * normal)
    if settings.uniform_mix > 0:
        uniform = torch.rand(batch_size, device=device, generator=generator)
        use_uniform = torch.rand(batch_size, device=device, generator=generator) < settings.uniform_mix
        t = torch.where(use_uniform, uniform, t)
    return shift_t(t, settings.shift)


def _expand(t: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, ...] broadcastable against `like`."""
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def add_noise(x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x + t eps."""
    t = _expand(t, x)
    return (1.0 - t) * x + t * eps


def x_to_v(x_t: Tensor, x_pred: Tensor, t: Tensor, t_min: float = T_MIN) -> Tensor:
    """v_hat = (x_t - x_hat) / max(t, t_min)."""
    return (x_t - x_pred) / _expand(t, x_t).clamp(min=t_min)


def v_target(x_t: Tensor, x: Tensor, t: Tensor, t_min: float = T_MIN) -> Tensor:
    """v = (x_t - x) / max(t, t_min): x_to_v of the clean image, so x_hat = x gives zero loss at every t.

    Equals eps - x for t >= t_min; below it both sides share the clamp (JiT).
    """
    return x_to_v(x_t, x, t, t_min)


def v_to_x(x_t: Tensor, v: Tensor, t: Tensor) -> Tensor:
    """x = x_t - t v (the inverse of the unclamped x_to_v)."""
    return x_t - _expand(t, x_t) * v


def v_loss(v_pred: Tensor, v_true: Tensor, reduction: str = "mean") -> Tensor:
    """Mean squared velocity error; reduction 'mean' (scalar) or 'none' (per sample, [B])."""
    per_sample = (v_pred.float() - v_true.float()).pow(2).flatten(1).mean(1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"v_loss reduction must be 'mean' or 'none', got {reduction!r}")


def timesteps(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> Tensor:
    """The sampling grid: steps + 1 values from 1 down to 0 on the shifted schedule."""
    if steps < 1:
        raise ValueError(f"sampling needs at least 1 step, got {steps}")
    return shift_t(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def euler_step(x_t: Tensor, x_pred: Tensor, t: float, t_next: float) -> Tensor:
    """x_next = x_t + (t_next - t) v with v = (x_t - x_hat) / t, written as x_hat + (t_next/t)(x_t - x_hat)."""
    return x_pred + (t_next / t) * (x_t - x_pred)


Denoise = Callable[[Tensor, Tensor], Tensor]
"""A function (x_t [B, ...], t [B]) -> x_pred [B, ...]; guidance is applied inside it."""


def sample(denoise: Denoise, noise: Tensor, steps: int, shift: float = 1.0, method: str = "euler") -> Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 with Euler or Heun (trapezoidal) steps."""
    if method not in ("euler", "heun"):
        raise ValueError(f"sampler method must be 'euler' or 'heun', got {method!r}")
    grid = timesteps(steps, shift).tolist()
    x = noise
    batch = noise.shape[0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        x_pred = denoise(x, torch.full((batch,), t, device=x.device))
        x_euler = euler_step(x, x_pred, t, t_next)
        if method == "euler" or t_next == 0.0:
            x = x_euler
            continue
        v_now = (x - x_pred) / t
        x_pred_next = denoise(x_euler, torch.full((batch,), t_next, device=x.device))
        v_next = (x_euler - x_pred_next) / t_next
        x = x + (t_next - t) * 0.5 * (v_now + v_next)
    return x


def guide(cond: Tensor, base: Tensor, scale: float) -> Tensor:
    """Guidance on predictions: out = base + w (cond - base) (CFG: base = unconditional)."""
    return base + scale * (cond - base)
