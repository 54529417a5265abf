"""Rectified-flow maths: noising, the velocity target, timestep sampling, shifted schedules, the Euler sampler.

Convention (SD3 / Flux / SnapGen++): t in [0, 1], t = 0 is data and t = 1 is pure noise,

    x_t = (1 - t) * x0 + t * noise,        v = d x_t / d t = noise - x0.

The model predicts v; sampling integrates dx/dt = v from t = 1 down to t = 0.

Time shift (SD3 eq. 23): a larger image has more redundant pixels, so the same t destroys less of its
signal; shifting t towards 1 with  t' = s t / (1 + (s - 1) t)  spends more steps/training at high noise.
`resolution_shift` picks s from the token count, as SD3 does (s = sqrt(N / N_base)).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = [
    "add_noise",
    "velocity_target",
    "predict_x0",
    "shift_timesteps",
    "resolution_shift",
    "sample_timesteps",
    "timestep_schedule",
    "euler_sample",
]


def _expand_t(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise, with t a scalar or one value per batch item."""
    t = _expand_t(t, x0)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target v = noise - x0."""
    return noise - x0


def predict_x0(x_t: torch.Tensor, velocity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Clean-sample estimate from a velocity prediction: x0 = x_t - t v."""
    return x_t - _expand_t(t, x_t) * velocity


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 time shift t' = s t / (1 + (s - 1) t); s > 1 moves mass towards noise, s = 1 is identity."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_tokens: int = 256, max_shift: Optional[float] = None) -> float:
    """SD3's resolution-dependent shift sqrt(N / N_base): 1 at the base token count, larger for bigger images."""
    if num_tokens <= 0 or base_tokens <= 0:
        raise ValueError(f"token counts must be positive, got num_tokens={num_tokens}, base_tokens={base_tokens}")
    s = math.sqrt(num_tokens / base_tokens)
    return min(s, max_shift) if max_shift is not None else s


def sample_timesteps(
    batch: int,
    num_tokens: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    shift: Optional[float] = None,
    base_tokens: int = 256,
    eps: float = 1e-5,
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Training timesteps: logit-normal(mean, std) (SD3), then the time shift.

    The shift is `shift` when given, else `resolution_shift(num_tokens, base_tokens)` when `num_tokens` is
    given, else 1. Values are clamped to [eps, 1 - eps] so neither endpoint is hit exactly.
    """
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.randn(batch, generator=generator, device=gen_device) * std + mean
    t = torch.sigmoid(u)
    if shift is None:
        shift = resolution_shift(num_tokens, base_tokens) if num_tokens is not None else 1.0
    t = shift_timesteps(t, shift).clamp(eps, 1 - eps)
    return t.to(device) if device is not None else t


def timestep_schedule(num_steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """num_steps + 1 decreasing times from 1 to 0 (uniform in t, then shifted); step i goes t[i] -> t[i+1]."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_timesteps(t, shift).to(dtype=torch.float32, device=device)


DenoiseFn = Callable[..., torch.Tensor]


def classifier_free_guidance(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """v_uncond + scale (v_cond - v_uncond): the velocity a guided sampler integrates (differentiable: losses use it)."""
    return v_uncond + scale * (v_cond - v_uncond)


@torch.no_grad()
def euler_sample(
    denoise_fn: DenoiseFn,
    noise: torch.Tensor,
    num_steps: int,
    shift: float = 1.0,
    guidance_scale: float = 1.0,
    *,
    timesteps: Optional[Sequence[float]] = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (noise) to t = 0 with Euler steps over a shifted schedule.

    `denoise_fn(x, t, conditional: bool) -> velocity`, with t of shape (B,). With guidance_scale != 1 it
    is called twice a step and combined as v = v_uncond + w (v_cond - v_uncond) (classifier-free
    guidance); with guidance_scale == 1 only the conditional branch runs. `timesteps` (decreasing, from
    the starting time to the final one) replaces the uniform-shifted schedule, e.g. for few-step students.
    """
    if timesteps is None:
        ts = timestep_schedule(num_steps, shift)
    else:
        ts = torch.as_tensor(list(timesteps), dtype=torch.float32)
        if ts.ndim != 1 or len(ts) < 2 or not bool((ts[1:] < ts[:-1]).all()):
            raise ValueError("timesteps must be a strictly decreasing sequence of at least two times")
    x = noise
    b = x.shape[0]
    steps = range(len(ts) - 1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    for i in steps:
        t, t_next = ts[i].item(), ts[i + 1].item()
        t_batch = torch.full((b,), t, device=x.device, dtype=torch.float32)
        v = denoise_fn(x, t_batch, True)
        if guidance_scale != 1.0:
            v_uncond = denoise_fn(x, t_batch, False)
            v = classifier_free_guidance(v, v_uncond, guidance_scale)
        x = x + (t_next - t) * v.to(x.dtype)
    return x
