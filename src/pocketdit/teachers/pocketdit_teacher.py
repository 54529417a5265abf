"""A PocketDiT as a teacher: a run, a checkpoint or a saved pipeline (any preset; any width of a supernet).

Its conventions are PocketDiT's own (t in [0, 1], v = noise - x0, unpacked latents), so the adapter only adds
classifier-free guidance with the null condition the model was trained with (caption dropout) and returns the
last Up-block tokens as features.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch

from ..flow import classifier_free_guidance
from ..text import encode_prompts
from .base import Teacher, TeacherOutput, register_teacher


@register_teacher("pocketdit")
class PocketDiTTeacher(Teacher):
    def __init__(self, transformer, text_conditioner, autoencoder=None, device=None, dtype=None):
        super().__init__(device, dtype)
        self.transformer = transformer.eval().requires_grad_(False)
        self.text_conditioner = text_conditioner
        self.hold_autoencoder(autoencoder)
        self.cache_size = 20000
        self._cache: "OrderedDict[str, tuple]" = OrderedDict()
        cfg = transformer.config
        self.latent_channels = cfg.in_channels
        self.feature_dim = cfg.hidden_size
        self.patch_size = cfg.patch_size
        self.patch_multiple = transformer.latent_multiple
        if device is not None or dtype is not None:
            self.transformer.to(device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, path, width: Optional[float] = None, device=None, dtype=None, ema: bool = True):
        """A run directory, a checkpoint-* directory or a saved pipeline; `width` cuts one width of a supernet."""
        from ..elastic import select_width
        from ..pipeline import PocketDiTPipeline

        pipe = PocketDiTPipeline.from_pretrained(str(path), ema=ema)
        transformer = select_width(pipe.transformer, width)
        return cls(transformer, pipe.text_conditioner, pipe.autoencoder, device=device, dtype=dtype)

    def encode_prompts(self, prompts: Sequence[Optional[str]]):
        """(states, masks) per encoder; a None prompt is the null condition (zero states, all-False masks), the
        input caption dropout trained. Each prompt's states are cached (up to `cache_size` prompts; frozen
        encoders give the same states for the same prompt, one prompt at a time as in training)."""
        rows = [self._encode_one(p) for p in prompts]
        n = len(rows[0][0])
        states = [torch.stack([r[0][i] for r in rows]).to(self.device) for i in range(n)]
        masks = [torch.stack([r[1][i] for r in rows]).to(self.device) for i in range(n)]
        return states, masks

    def _encode_one(self, prompt: Optional[str]):
        key = "\0null" if prompt is None else prompt
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if prompt is None:
            s, m = self.text_conditioner.unconditional(1, device="cpu")
            row = ([x[0] for x in s], [x[0].bool() for x in m])
        else:
            s, m = encode_prompts(self.text_conditioner, [prompt])
            row = ([x[0].cpu() for x in s], [x[0].cpu().bool() for x in m])
        if self.cache_size > 0:
            self._cache[key] = row
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return row

    def _run(self, x, t, states, masks, output_features):
        dtype = next(self.transformer.parameters()).dtype
        if len(states) == 1:
            states, masks = states[0], masks[0]
            states = states.to(dtype)
        else:
            states = [s.to(dtype) for s in states]
        out = self.transformer(x.to(dtype), t, states, masks, output_features=output_features)
        return out.sample.float(), out.features

    def predict(self, x_t, t, cond, guidance_scale=1.0, output_features=False) -> TeacherOutput:
        states, masks = cond
        v, feats = self._run(x_t, t, states, masks, output_features)
        if guidance_scale != 1.0:
            null_states = [torch.zeros_like(s) for s in states]
            null_masks = [torch.zeros_like(m) for m in masks]
            v_uncond, _ = self._run(x_t, t, null_states, null_masks, False)
            v = classifier_free_guidance(v, v_uncond, guidance_scale)
        p = self.patch_size
        grid = (x_t.shape[-2] // p, x_t.shape[-1] // p)
        return TeacherOutput(v, feats.float() if feats is not None else None, grid)
