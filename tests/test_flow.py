"""Rectified-flow maths: noising endpoints, target, timestep sampling, schedules, Euler + CFG."""


import pytest
import torch

from pocketdit import flow


def test_add_noise_endpoints_and_interpolation():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    assert torch.equal(flow.add_noise(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(flow.add_noise(x0, noise, torch.ones(3)), noise)
    t = torch.tensor([0.25, 0.5, 0.75])
    xt = flow.add_noise(x0, noise, t)
    for i in range(3):
        assert torch.allclose(xt[i], (1 - t[i]) * x0[i] + t[i] * noise[i])


def test_velocity_target_is_derivative_of_path_and_recovers_x0():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    v = flow.velocity_target(x0, noise)
    assert torch.equal(v, noise - x0)
    t, dt = torch.full((2,), 0.3), 1e-3
    finite_diff = (flow.add_noise(x0, noise, t + dt) - flow.add_noise(x0, noise, t)) / dt
    assert torch.allclose(finite_diff, v, atol=1e-3)
    xt = flow.add_noise(x0, noise, t)
    assert torch.allclose(flow.predict_x0(xt, v, t), x0, atol=1e-6)


def test_shift_is_identity_at_one_and_moves_towards_noise():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(flow.shift_timesteps(t, 1.0), t)
    shifted = flow.shift_timesteps(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert bool((shifted[1:-1] > t[1:-1]).all())
    assert flow.shift_timesteps(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="shift"):
        flow.shift_timesteps(t, 0.0)


def test_resolution_shift_follows_token_count():
    assert flow.resolution_shift(256) == pytest.approx(1.0)
    assert flow.resolution_shift(1024) == pytest.approx(2.0)
    assert flow.resolution_shift(4096, max_shift=3.0) == pytest.approx(3.0)


def test_logit_normal_range_median_and_shift():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_timesteps(20000, generator=g)
    assert t.min() > 0 and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.02)
    # logit(t) ~ N(0, 1)
    logit = torch.log(t / (1 - t))
    assert logit.std().item() == pytest.approx(1.0, abs=0.03)
    t_big = flow.sample_timesteps(20000, num_tokens=4096, generator=torch.Generator().manual_seed(0))
    assert t_big.median().item() == pytest.approx(0.8, abs=0.02)  # shift 4: 4*0.5/(1+3*0.5)


def test_sample_timesteps_seeded():
    a = flow.sample_timesteps(8, generator=torch.Generator().manual_seed(5))
    b = flow.sample_timesteps(8, generator=torch.Generator().manual_seed(5))
    c = flow.sample_timesteps(8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedule_monotone_from_one_to_zero(shift):
    ts = flow.timestep_schedule(10, shift)
    assert ts.shape == (11,)
    assert ts[0].item() == 1.0 and ts[-1].item() == 0.0
    assert bool((ts[1:] < ts[:-1]).all())
    if shift > 1:
        assert bool((ts[1:-1] > flow.timestep_schedule(10, 1.0)[1:-1]).all())
    with pytest.raises(ValueError):
        flow.timestep_schedule(0)


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (4, 3.0), (25, 1.0)])
def test_euler_integrates_straight_flow_exactly(steps, shift):
    # For a fixed pair (x0, noise) the true velocity is constant, so Euler is exact for any schedule.
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    out = flow.euler_sample(lambda x, t, cond: noise - x0, noise, steps, shift=shift)
    assert torch.allclose(out, x0, atol=1e-5)


def test_euler_on_linear_field_matches_closed_form():
    # v(x, t) = x / t is the field of x_t = t * noise (x0 = 0); integrating to t=eps gives eps*noise.
    noise = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    out = flow.euler_sample(lambda x, t, c: x / t[:, None, None, None], noise, 5, timesteps=[1.0, 0.8, 0.6, 0.4, 0.2])
    assert torch.allclose(out, 0.2 * noise, atol=1e-6)


def test_cfg_scale_one_is_conditional_and_combines_branches():
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    calls = []

    def fn(x, t, cond):
        calls.append(cond)
        return torch.full_like(x, 1.0 if cond else -1.0)

    out1 = flow.euler_sample(fn, noise, 4, guidance_scale=1.0)
    assert calls == [True] * 4  # no unconditional pass at scale 1
    assert torch.allclose(out1, noise - 1.0)
    calls.clear()
    out3 = flow.euler_sample(fn, noise, 4, guidance_scale=3.0)
    assert calls.count(False) == 4
    # v = -1 + 3 * (1 - (-1)) = 5, integrated over t from 1 to 0 -> x = noise - 5
    assert torch.allclose(out3, noise - 5.0, atol=1e-6)


def test_euler_sampling_records_no_graph_but_guidance_is_differentiable():
    w = torch.nn.Parameter(torch.tensor(0.5))
    out = flow.euler_sample(lambda x, t, cond: w * x, torch.ones(1, 1, 2, 2), 3, guidance_scale=2.0)
    assert not out.requires_grad  # sampling is inference: no autograd graph over the steps
    v = flow.classifier_free_guidance(w * torch.ones(2), torch.zeros(2), 3.0)
    v.sum().backward()
    assert w.grad.item() == 6.0


def test_euler_rejects_bad_timesteps():
    with pytest.raises(ValueError, match="decreasing"):
        flow.euler_sample(lambda x, t, c: x, torch.zeros(1, 1, 2, 2), 2, timesteps=[0.2, 0.5])
