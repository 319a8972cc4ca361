"""Property tests of the one timestep convention (composer_prx.flow)."""

import math

import pytest
import torch
from torch import nn

from composer_prx import flow
from composer_prx.model.pipeline import PRXModel


def test_noising_endpoints():
    x, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    assert torch.equal(flow.add_noise(x, eps, torch.zeros(4)), x)
    assert torch.equal(flow.add_noise(x, eps, torch.ones(4)), eps)
    mid = flow.add_noise(x, eps, torch.full((4,), 0.25))
    torch.testing.assert_close(mid, 0.75 * x + 0.25 * eps)


def test_x_v_round_trip_and_clamp():
    x, eps = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    t = torch.tensor([0.06, 0.1, 0.3, 0.5, 0.9, 1.0])
    x_t = flow.add_noise(x, eps, t)
    v = flow.x_to_v(x_t, x, t)
    torch.testing.assert_close(v, eps - x)  # above t_min the true x gives the true velocity d x_t / d t
    torch.testing.assert_close(flow.v_target(x_t, x, t), eps - x)
    torch.testing.assert_close(flow.v_to_x(x_t, v, t), x)
    small = torch.full((6,), 0.01)
    x_small = flow.add_noise(x, eps, small)
    torch.testing.assert_close(flow.x_to_v(x_small, x, small), (x_small - x) / 0.05)  # max(t, 0.05)
    torch.testing.assert_close(flow.v_target(x_small, x, small), (x_small - x) / 0.05)  # the target clamps alike


class FreeImage(nn.Module):
    """A "denoiser" whose prediction is a free tensor x_hat, whatever its input: the loss is then a function of x_hat."""

    def __init__(self, shape):
        super().__init__()
        self.x_hat = nn.Parameter(torch.zeros(shape))

    def forward(self, x_t, t, text, text_mask=None):
        return self.x_hat.expand_as(x_t)


def training_loss_minimiser(t_value: float, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """argmin over x_hat of PRXModel's training loss at t = t_value with fixed noise, found by L-BFGS."""
    denoiser = FreeImage(x.shape)
    model = PRXModel(denoiser, time_sampling=flow.TimeSampling(mean=math.log(t_value / (1 - t_value)), std=1e-6),
                     caption_dropout=0.0)
    batch = {"image": x, "text_emb": torch.zeros(x.shape[0], 2, 4)}

    def loss_of_x_hat():
        torch.manual_seed(0)  # the same eps every evaluation: the loss is a deterministic function of x_hat
        out = model(batch)
        torch.testing.assert_close(out.t, torch.full_like(out.t, t_value))
        return model.loss(out, batch)

    opt = torch.optim.LBFGS(denoiser.parameters(), lr=1.0, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_of_x_hat()
        loss.backward()
        return loss

    opt.step(closure)
    minimiser = denoiser.x_hat.detach().clone()
    with torch.no_grad():
        denoiser.x_hat.copy_(x)
        loss_at_x = loss_of_x_hat().item()
    return minimiser, loss_at_x


@pytest.mark.parametrize("t_value", [0.01, 0.03, 0.05, 0.3, 0.9])
def test_training_loss_minimiser_is_the_clean_image_at_every_t(t_value):
    """The x_hat that minimises the training loss is x at every t, also below the clamp t_min = 0.05."""
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    minimiser, loss_at_x = training_loss_minimiser(t_value, x)
    torch.testing.assert_close(minimiser, x, rtol=0, atol=1e-4)
    assert loss_at_x < 1e-10


def test_shift_monotone_identity_and_endpoints():
    t = torch.linspace(0, 1, 101)
    assert torch.equal(flow.shift_t(t, 1.0), t)
    for s in (0.5, 2.0, 3.0, 6.0):
        shifted = flow.shift_t(t, s)
        assert torch.all(shifted[1:] > shifted[:-1])
        assert shifted[0] == 0 and shifted[-1] == 1
    assert torch.all(flow.shift_t(t[1:-1], 3.0) > t[1:-1])  # s > 1 moves mass towards noise


def test_sample_t_distribution():
    gen = torch.Generator().manual_seed(0)
    t = flow.sample_t(20000, flow.TimeSampling(mean=0.0, std=1.0), generator=gen)
    assert t.min() > 0 and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.02
    shifted = flow.sample_t(20000, flow.TimeSampling(shift=3.0), generator=torch.Generator().manual_seed(0))
    assert shifted.median() > 0.7  # median maps to 3*0.5/(1+2*0.5) = 0.75
    mixed = flow.sample_t(20000, flow.TimeSampling(std=0.1, uniform_mix=0.5), generator=gen)
    assert ((mixed < 0.2) | (mixed > 0.8)).float().mean() > 0.15  # the uniform half (expected 0.2) reaches the tails
    with pytest.raises(ValueError, match="std"):
        flow.TimeSampling(std=0)


@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("shift, steps", [(1.0, 7), (1.0, 25), (1.0, 50), (3.0, 7), (3.0, 25)])
def test_sampler_on_the_exact_optimum_recovers_x(method, shift, steps):
    """x_hat = x (the training loss's minimiser at every t) walked from pure noise lands on x."""
    x, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    calls = []

    def oracle(x_t, t):  # the exact optimum for a path from this one x
        calls.append(t[0].item())
        return x.expand_as(x_t)

    out = flow.sample(oracle, eps, steps=steps, shift=shift, method=method)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    assert calls[0] == 1.0 and min(calls) > 0.0
    assert len(calls) == (steps if method == "euler" else 2 * steps - 1)  # Heun: 2 per step except the last


@pytest.mark.parametrize("shift", [0.5, 3.0, 6.0])
def test_shift_moves_the_sampling_grid_as_defined(shift):
    """The denoiser is called at t' = s t / (1 + (s - 1) t) of the uniform grid 1, 1 - 1/n, ..., 1/n."""
    steps = 10
    seen = {}

    def record(key):
        def denoise(x_t, t):
            seen.setdefault(key, []).append(t[0].item())
            return 0.5 * x_t  # not an oracle: the path depends on where it is evaluated
        return denoise

    noise = torch.randn(1, 3, 4, 4)
    plain = flow.sample(record("plain"), noise, steps)
    shifted = flow.sample(record("shifted"), noise, steps, shift=shift)
    uniform = [1 - i / steps for i in range(steps)]
    assert seen["plain"] == pytest.approx(uniform, abs=1e-6)
    assert seen["shifted"] == pytest.approx([shift * t / (1 + (shift - 1) * t) for t in uniform], abs=1e-6)
    interior = zip(seen["plain"][1:], seen["shifted"][1:])
    assert all((s > p) if shift > 1 else (s < p) for p, s in interior)  # s > 1 spends more steps near noise
    assert not torch.allclose(plain, shifted)


def test_euler_step_follows_velocity():
    x_t, x_pred = torch.randn(3, 5), torch.randn(3, 5)
    v = (x_t - x_pred) / 0.8
    torch.testing.assert_close(flow.euler_step(x_t, x_pred, 0.8, 0.5), x_t + (0.5 - 0.8) * v)


def test_bad_arguments():
    with pytest.raises(ValueError, match="method"):
        flow.sample(lambda x, t: x, torch.zeros(1, 2), 3, method="rk4")
    with pytest.raises(ValueError, match="at least 1 step"):
        flow.timesteps(0)
    with pytest.raises(ValueError, match="reduction"):
        flow.v_loss(torch.zeros(2, 2), torch.zeros(2, 2), reduction="sum")
