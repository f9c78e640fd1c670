"""Flow-matching Euler sampler on the shifted grid, with classifier-free guidance (docs/SHOWO2.md §3.3-3.4).

x_t = t * data + (1 - t) * noise; t = 0 is noise. "N steps" = N grid points = N - 1 model calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

# velocity_fn(x, t, step) -> v: x (M, C, h, w) fp32 state; t (M,) fp32; step = call index 0..N-2.
VelocityFn = Callable[[Tensor, Tensor, int], Tensor]


def time_grid(num_points: int, shift: float = 3.0) -> Tensor:
    """t_k = u / (u + s - s u), u = k / (N - 1): more points near the noise end. fp32 (N,)."""
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2 (N points = N - 1 model calls), got {num_points}")
    u = torch.linspace(0, 1, num_points)
    return u / (u + shift - shift * u)


def cfg_combine(v: Tensor, guidance: float) -> Tensor:
    """Rows [cond, null] -> v_null + g (v_cond - v_null) in the model dtype, repeated for both halves."""
    cond, null = v.chunk(2)
    guided = null + guidance * (cond - null)
    return torch.cat([guided, guided])


def draw_noise(shape: Sequence[int], seed: int) -> Tensor:
    """Upstream draws on the CPU generator and rounds to bf16; the sampler state is fp32."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen).to(torch.bfloat16).float()


def draw_noise_per_prompt(shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
    """Noise (B, ...) whose row i is ``draw_noise((1, ...), seeds[i])``: each prompt's noise depends on its own
    seed only, not on which prompts share its batch (so a prompt split across batches or processes keeps its
    noise). ``draw_noise`` draws the whole batch from one generator instead: upstream's behaviour."""
    shape, seeds = tuple(shape), [int(s) for s in seeds]
    if not shape or shape[0] != len(seeds):
        raise ValueError(f"seeds must hold one seed per prompt (row of the noise shape {shape}), got {len(seeds)}")
    return torch.cat([draw_noise((1, *shape[1:]), s) for s in seeds])


def initial_noise(shape: Sequence[int], seed: int, seeds: Sequence[int] | None) -> Tensor:
    """The sampler's starting noise: ``draw_noise(shape, seed)`` (one generator for the batch), or one generator
    per prompt when ``seeds`` are given (``draw_noise_per_prompt``; ``seed`` is then unused)."""
    return draw_noise(shape, seed) if seeds is None else draw_noise_per_prompt(shape, seeds)


def euler_sample(
    velocity_fn: VelocityFn,
    noise: Tensor,
    grid: Tensor,
    guidance: float | Sequence[float] | None,
    progress: bool = False,
) -> Tensor:
    """Integrate from ``noise`` (B, C, h, w) along ``grid``; returns the final state (B, C, h, w) fp32.

    ``guidance``: None = unguided (model batch B); a float, or one value per call (adaptive guidance).
    """
    calls = grid.numel() - 1
    scales = None if guidance is None else [guidance] * calls if isinstance(guidance, (int, float)) else list(guidance)
    if scales is not None and len(scales) != calls:
        raise ValueError(f"guidance schedule has {len(scales)} values for {calls} model calls")
    x = noise.float() if scales is None else torch.cat([noise, noise]).float()
    grid = grid.to(x.device)
    for k in tqdm(range(calls), desc="denoising", disable=not progress, leave=False):
        t = grid[k].expand(x.shape[0])
        v = velocity_fn(x, t, k)
        if scales is not None:
            v = cfg_combine(v, scales[k])
        x = x + (grid[k + 1] - grid[k]) * v.float()
    return x if scales is None else x.chunk(2)[0]
