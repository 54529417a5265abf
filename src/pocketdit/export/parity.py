"""Parity of exported graphs against eager PyTorch, per graph and for a whole few-step generation.

PSNR is measured on fresh random inputs (not the export examples): peak = the eager output's value range
for intermediate graphs, 2.0 for images in [-1, 1]. Below the threshold the export fails with the number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..quantize import psnr
from .graphs import GraphSpec, fresh_inputs

DEFAULT_MIN_PSNR = 35.0


class ParityError(RuntimeError):
    """An exported graph (or the generation through it) disagrees with eager PyTorch."""


@dataclass
class ParityResult:
    name: str
    psnr: float
    max_abs_error: float
    runtime: str

    def as_dict(self) -> dict:
        return {"psnr_db": _finite(self.psnr), "max_abs_error": self.max_abs_error, "runtime": self.runtime}


def _finite(x: float):
    return None if x == float("inf") else round(x, 2)


@torch.no_grad()
def check_graph(spec: GraphSpec, runner: Callable, runtime: str, min_psnr: float = DEFAULT_MIN_PSNR, seed: int = 1, trials: int = 2) -> ParityResult:
    """Run `runner` and the eager module on `trials` fresh random inputs; the worst PSNR counts."""
    worst, worst_err = float("inf"), 0.0
    for i in range(trials):
        inputs = fresh_inputs(spec, seed + i)
        ref = spec.module(*inputs)
        out = runner(*inputs).to(ref.dtype)
        if out.shape != ref.shape:
            raise ParityError(f"{spec.name} ({runtime}): output shape {tuple(out.shape)} != eager {tuple(ref.shape)}")
        worst = min(worst, psnr(out, ref))
        worst_err = max(worst_err, (out - ref).abs().max().item())
    result = ParityResult(spec.name, worst, worst_err, runtime)
    if not worst >= min_psnr:
        raise ParityError(
            f"{spec.name} exported for {runtime} disagrees with eager PyTorch: PSNR {worst:.2f} dB < {min_psnr} dB "
            f"(max abs error {worst_err:.3g})"
        )
    return result


@torch.no_grad()
def generate(
    denoise: Callable,
    noise: torch.Tensor,
    text_states: list,
    text_masks: list,
    num_steps: int = 4,
    shift: float = 1.0,
    decode: Optional[Callable] = None,
) -> torch.Tensor:
    """Few-step Euler generation through graph-shaped callables.

    denoise(latents, t, *states, *masks) -> velocity, with float 0/1 masks; decode(latents) -> image.
    Guidance is folded into few-step students, so one call a step.
    """
    from ..flow import euler_sample

    def denoise_fn(x, t, conditional):
        return denoise(x, t, *text_states, *text_masks)

    latents = euler_sample(denoise_fn, noise, num_steps, shift)
    return decode(latents) if decode is not None else latents


def check_generation(eager: dict, exported: dict, inputs: dict, runtime: str, num_steps: int = 4, shift: float = 1.0, min_psnr: float = DEFAULT_MIN_PSNR) -> ParityResult:
    """Whole generation (text encoder -> num_steps denoiser calls -> decoder) eager vs exported.

    `eager` and `exported` map graph names ("text_encoder", "denoiser", "decoder") to callables; missing
    text encoder = `inputs["text_states"]` are used directly; missing decoder = latents are the image.
    """
    images = []
    for graphs in (eager, exported):
        if "text_encoder" in graphs:
            states = [graphs["text_encoder"](inputs["input_ids"], inputs["attention_mask"])]
            masks = [inputs["attention_mask"].float()]
        else:
            states, masks = inputs["text_states"], inputs["text_masks"]
        images.append(generate(graphs["denoiser"], inputs["noise"], states, masks, num_steps, shift, graphs.get("decoder")))
    ref, out = images
    value = psnr(out, ref, peak=2.0)
    result = ParityResult(f"image_{num_steps}_steps", value, (out - ref).abs().max().item(), runtime)
    if not value >= min_psnr:
        raise ParityError(
            f"{num_steps}-step generation through {runtime} disagrees with eager PyTorch: image PSNR {value:.2f} dB < {min_psnr} dB"
        )
    return result
