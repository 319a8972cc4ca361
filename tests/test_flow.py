"""Property tests of the one timestep convention (composer_prx.flow)."""

import pytest
import torch

from composer_prx import flow


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
    torch.testing.assert_close(v, flow.v_target(x, eps))  # the true x gives the true velocity
    torch.testing.assert_close(flow.v_to_x(x_t, v, t), x)
    small = torch.full((6,), 0.01)
    x_small = flow.add_noise(x, eps, small)
    torch.testing.assert_close(flow.x_to_v(x_small, x, small), (x_small - x) / 0.05)  # max(t, 0.05)


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
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sampler_recovers_known_linear_path(method, shift):
    x, eps = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    calls = []

    def oracle(x_t, t):  # a perfect x-predictor for a path from this one x
        calls.append(t[0].item())
        return x.expand_as(x_t)

    out = flow.sample(oracle, eps, steps=7, shift=shift, method=method)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)
    assert calls[0] == 1.0 and min(calls) > 0.0
    assert len(calls) == (7 if method == "euler" else 13)  # Heun: 2 per step except the last


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
