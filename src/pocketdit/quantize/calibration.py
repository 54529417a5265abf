"""Calibration inputs: the denoiser keyword-argument dicts that sensitivity, GPTQ statistics and
self-distillation run the model on.

`trajectory_calibration` records the fp32 pipeline's own guided sampling trajectories (what `pocketdit
quantize` uses); `random_calibration` is a synthetic stand-in when no text encoder or data is at hand.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import flow


def random_calibration(
    model, num_batches: int = 4, batch_size: int = 2, latent_size: Optional[int] = None, text_length: int = 16, seed: int = 0
) -> list[dict]:
    """Synthetic denoiser inputs: x_t from Gaussian "images" and noise at uniform t, Gaussian text states.

    A stand-in when no data is at hand; calibrate on real latents and prompt embeddings when you have them
    (pass any list of model keyword dicts as `calibration`).
    """
    cfg = model.config
    size = latent_size or 4 * model.latent_multiple
    while not model.is_valid_latent_size(size, size):
        size += model.latent_multiple
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        t = torch.rand(batch_size, generator=g)
        x0 = torch.randn(batch_size, cfg.in_channels, size, size, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        states = [torch.randn(batch_size, text_length, d, generator=g) for d in cfg.text_embed_dims]
        masks = []
        for _ in cfg.text_embed_dims:
            lengths = torch.randint(1, text_length + 1, (batch_size,), generator=g)
            masks.append(torch.arange(text_length)[None] < lengths[:, None])
        one = len(states) == 1
        batches.append(
            dict(
                hidden_states=x, timestep=t, encoder_hidden_states=states[0] if one else states,
                encoder_attention_mask=masks[0] if one else masks,
            )
        )
    return batches


def trajectory_calibration(
    pipe, prompts: Sequence[str], num_steps: int, seed: int = 0, batch_size: int = 8, guidance_scale: Optional[float] = None
) -> list[dict]:
    """Denoiser inputs along the fp32 pipeline's own sampling trajectories, as it samples them: with its
    classifier-free guidance (default: the pipeline's). With guidance each batch stacks the conditional
    call (first half) and the unconditional, null-text call (second half) of one step on the same latents,
    so sensitivity and self-distillation see both: the trajectory follows v_u + w (v_c - v_u), which
    amplifies errors in either. Without guidance, the conditional calls only."""
    model = pipe.transformer
    size = pipe.default_size or 32
    lh, lw = pipe.check_image_size(size, size)
    guidance = pipe.default_guidance if guidance_scale is None else float(guidance_scale)
    batches = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        states, masks = pipe._encode(chunk)
        if guidance != 1.0:
            states = [torch.cat([s, torch.zeros_like(s)]) for s in states]
            masks = [torch.cat([m, torch.zeros_like(m)]) for m in masks]
        if len(states) == 1:
            states, masks = states[0], masks[0]
        g = torch.Generator().manual_seed(seed + start)
        noise = torch.randn(len(chunk), pipe.autoencoder.latent_channels, lh, lw, generator=g)

        def denoise(x, t, conditional):
            if guidance != 1.0:
                x, t = torch.cat([x, x]), torch.cat([t, t])
            batches.append(dict(hidden_states=x.clone(), timestep=t.clone(), encoder_hidden_states=states, encoder_attention_mask=masks))
            with torch.no_grad():
                v = model(x, t, states, masks).sample
            if guidance == 1.0:
                return v
            return flow.classifier_free_guidance(*v.chunk(2), guidance)

        # the guided velocity comes back from the "conditional" call; the unconditional one is then not needed
        flow.euler_sample(denoise, noise, num_steps, shift=pipe.shift, guidance_scale=1.0)
    return batches
