"""Euler flow sampler (docs/SHOWO2.md §3.3-3.4): shifted time grid, N - 1 calls, CFG, guidance schedules, noise."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flashu_fx.sampler import cfg_combine, draw_noise, draw_noise_per_prompt, euler_sample, time_grid


def test_time_grid_n50_values():
    grid = time_grid(50)
    assert grid.shape == (50,) and grid.dtype == torch.float32
    torch.testing.assert_close(grid[:4], torch.tensor([0.0, 0.0069, 0.0140, 0.0213]), rtol=0, atol=5e-5)
    torch.testing.assert_close(grid[-4:], torch.tensor([0.8364, 0.8868, 0.9412, 1.0]), rtol=0, atol=5e-5)
    assert grid[0] == 0.0 and grid[-1] == 1.0
    assert bool((grid[1:] > grid[:-1]).all())
    # first and last steps of the documented grid: 1/145 and 0.0588
    assert abs(float(grid[1] - grid[0]) - 1 / 145) < 1e-7 and abs(float(grid[-1] - grid[-2]) - 0.0588) < 5e-5


@settings(deadline=None, max_examples=30)
@given(n=st.integers(2, 200), shift=st.floats(1.0, 6.0))
def test_time_grid_is_the_sd3_shift(n, shift):
    """sigma' = s sigma / (1 + (s - 1) sigma) with sigma = 1 - u: the same grid written the other way."""
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    sigma = 1 - u
    expected = 1 - shift * sigma / (1 + (shift - 1) * sigma)
    torch.testing.assert_close(time_grid(n, shift).double(), expected, rtol=0, atol=1e-6)


def test_time_grid_needs_two_points():
    with pytest.raises(ValueError, match="num_points"):
        time_grid(1)


def test_fifty_points_are_49_calls_at_the_grid_times():
    grid = time_grid(50)
    seen = []

    def velocity(x, t, step):
        seen.append((step, t.clone()))
        return torch.zeros_like(x)

    euler_sample(velocity, torch.zeros(2, 1, 2, 2), grid, guidance=None)
    assert [s for s, _ in seen] == list(range(49))
    for k, t in seen:
        assert t.shape == (2,) and t.dtype == torch.float32 and bool((t == grid[k]).all())


def test_euler_on_a_linear_ode():
    """dx/dt = a x: Euler gives x0 * prod(1 + a dt_k) exactly, computed independently in float64."""
    grid = time_grid(12)
    a = torch.tensor([-0.7, 0.3, 1.1]).view(3, 1, 1, 1)
    x0 = torch.randn(3, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    out = euler_sample(lambda x, t, step: a * x, x0, grid, guidance=None)
    factor = torch.ones(3, 1, 1, 1, dtype=torch.float64)
    for k in range(11):
        factor = factor * (1 + a.double() * float(grid[k + 1] - grid[k]))
    torch.testing.assert_close(out.double(), x0.double() * factor, rtol=1e-5, atol=1e-6)
    assert out.dtype == torch.float32


def test_constant_velocity_moves_noise_by_one():
    noise = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    target = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    out = euler_sample(lambda x, t, step: target - noise, noise, time_grid(7), guidance=None)
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5)


def test_cfg_combine():
    cond, null = torch.full((2, 3), 2.0), torch.full((2, 3), -1.0)
    out = cfg_combine(torch.cat([cond, null]), 4.0)
    assert out.shape == (4, 3)
    torch.testing.assert_close(out, torch.full((4, 3), -1.0 + 4.0 * 3.0))
    torch.testing.assert_close(cfg_combine(torch.cat([cond, null]), 1.0), torch.cat([cond, cond]))
    torch.testing.assert_close(cfg_combine(torch.cat([cond, null]), 0.0), torch.cat([null, null]))


def test_guided_sampling_runs_cond_and_null_rows():
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    shapes = []

    def velocity(x, t, step):
        shapes.append(x.shape[0])
        assert torch.equal(x[:2], x[2:])  # both halves follow one trajectory
        return torch.cat([torch.full_like(x[:2], 1.0), torch.full_like(x[2:], 3.0)])  # cond 1, null 3

    out = euler_sample(velocity, noise, time_grid(5), guidance=2.0)
    assert shapes == [4] * 4 and out.shape == noise.shape
    torch.testing.assert_close(out, noise + (3.0 + 2.0 * (1.0 - 3.0)))


def test_guidance_schedule_one_value_per_call():
    noise = torch.zeros(1, 1, 1, 1)
    schedule = [0.0, 1.0, 2.0, 3.0]

    def velocity(x, t, step):
        return torch.cat([torch.ones_like(x[:1]), torch.zeros_like(x[1:])])  # cond 1, null 0: v = g

    grid = time_grid(5)
    out = euler_sample(velocity, noise, grid, guidance=schedule)
    expected = sum(g * float(grid[k + 1] - grid[k]) for k, g in enumerate(schedule))
    assert abs(float(out) - expected) < 1e-6


@pytest.mark.parametrize("length", [3, 5])
def test_guidance_schedule_length_error(length):
    with pytest.raises(ValueError, match=f"{length} values for 4 model calls"):
        euler_sample(lambda x, t, s: x, torch.zeros(1, 1, 1, 1), time_grid(5), guidance=[1.0] * length)


def test_noise_is_seeded_and_bf16_rounded():
    a, b, c = draw_noise((2, 16, 8, 8), 7), draw_noise((2, 16, 8, 8), 7), draw_noise((2, 16, 8, 8), 8)
    assert a.dtype == torch.float32 and a.shape == (2, 16, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, a.to(torch.bfloat16).float())  # every value is a bf16 number
    reference = torch.randn((2, 16, 8, 8), generator=torch.Generator().manual_seed(7))  # the CPU generator
    assert torch.equal(a, reference.to(torch.bfloat16).float())
    assert not torch.equal(a, reference)


def test_per_prompt_noise_rows_are_their_own_draws():
    noise = draw_noise_per_prompt((3, 16, 4, 4), [5, 9, 5])
    for row, seed in zip(noise, [5, 9, 5], strict=True):
        assert torch.equal(row[None], draw_noise((1, 16, 4, 4), seed))
    assert torch.equal(draw_noise_per_prompt((2, 16, 4, 4), [5, 9])[1], noise[1])  # its batch-mates do not matter
    with pytest.raises(ValueError, match="one seed per prompt"):
        draw_noise_per_prompt((2, 16, 4, 4), [1])
