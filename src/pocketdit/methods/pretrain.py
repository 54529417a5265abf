"""Flow-matching pretraining (SnapGen++ stage 1, without the elastic sub-nets).

    x0 = autoencoder.encode(image)        (or batch["latents"] when latents were cached)
    t ~ logit-normal, time-shifted (the config's schedule section);  noise ~ N(0, I)
    x_t = (1 - t) x0 + t noise;            loss = || model(x_t, t, text) - (noise - x0) ||^2

Caption dropout (pocketdit.text.caption_dropout) is applied here, per text encoder, by turning that
encoder's mask all False (the model then attends only to its learned null token) - the same input the
sampler uses for the unconditional branch of classifier-free guidance.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from .. import flow
from ..text import caption_dropout, caption_dropout_probs, encode_prompts
from .base import TrainingMethod, register_method

# Prompts the text cache encodes at once (cache misses, padded to this many).
TEXT_ENCODE_CHUNK = 64


@register_method("pretrain")
class FlowMatchingPretrain(TrainingMethod):
    """Velocity-matching loss on (image, caption) batches.

    Args:
        model: a PocketDiT (or a wrapped one; the trainer may swap in DDP/FSDP).
        text_conditioner: gives per-encoder (states, masks) for a list of prompts.
        autoencoder: `encode(images in [-1, 1]) -> latents`; `PixelSpace()` for pixel-space models.
        logit_mean, logit_std, shift: the timestep distribution, shift(sigmoid(N(mean, std))); the trainer
            passes the config's `schedule` section, the same shift the sampler uses.
        caption_dropout: per-encoder probability (or one for all); None = the conditioner's dropout_probs.
        text_cache_size: keep the encoder outputs of up to this many distinct captions (0 = off). Frozen
            encoders give the same states for the same caption, so caching changes nothing but speed; worth
            it for datasets with repeated captions (shapes) where the text encoder costs as much as the DiT.
        contrastive_weight, contrastive_margin, contrastive_min_t: the caption-contrastive term
            (`contrastive_term`; 0 = off), for datasets that give a `negative_caption` per item.
    """

    def __init__(
        self,
        model,
        text_conditioner,
        autoencoder,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 3.0,
        caption_dropout: Union[float, Sequence[float], None] = None,
        text_cache_size: int = 0,
        contrastive_weight: float = 0.0,
        contrastive_margin: float = 0.05,
        contrastive_min_t: float = 0.4,
    ):
        if not (math.isfinite(contrastive_weight) and contrastive_weight >= 0):
            raise ValueError(f"method.contrastive_weight must be a finite number >= 0, got {contrastive_weight}")
        if not (math.isfinite(contrastive_margin) and contrastive_margin > 0) or not 0 <= contrastive_min_t < 1:
            raise ValueError(f"need method.contrastive_margin > 0 and 0 <= method.contrastive_min_t < 1, got "
                             f"{contrastive_margin}, {contrastive_min_t}")
        self.contrastive = (float(contrastive_weight), float(contrastive_margin), float(contrastive_min_t))
        self.model = model
        self.text_conditioner = text_conditioner
        self.autoencoder = autoencoder
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        if not float(shift) > 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.shift = float(shift)
        self.dropout_probs = caption_dropout_probs(text_conditioner, caption_dropout)
        self.generator = torch.Generator().manual_seed(0)
        if text_cache_size < 0:
            raise ValueError(f"text_cache_size must be >= 0, got {text_cache_size}")
        self.text_cache_size = int(text_cache_size)
        self._text_cache: "OrderedDict[str, tuple]" = OrderedDict()

    def to(self, device):
        for part in (self.text_conditioner, self.autoencoder):
            if hasattr(part, "to"):
                part.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def latents(self, batch: dict) -> torch.Tensor:
        device = self.device
        if "latents" in batch:
            return batch["latents"].to(device, torch.float32)
        with torch.no_grad():
            return self.autoencoder.encode(batch["image"].to(device, torch.float32)).float()

    def text(self, prompts: Sequence[str]):
        """Encode prompts and apply caption dropout (drawn from self.generator)."""
        device = self.device
        with torch.no_grad():
            states, masks = self._encode_cached(list(prompts))
        states, masks = [s.to(device) for s in states], [m.to(device) for m in masks]
        return caption_dropout(states, masks, self.dropout_probs, generator=self.generator)

    def _encode_cached(self, prompts: list[str]):
        if self.text_cache_size == 0:
            return encode_prompts(self.text_conditioner, prompts)
        cache = self._text_cache
        missing = list(dict.fromkeys(p for p in prompts if p not in cache))
        for i in range(0, len(missing), TEXT_ENCODE_CHUNK):
            # Fixed-shape chunks (the last one padded with copies of its last prompt): a caption's states then do
            # not depend on which batch first brought it in (rows of a fixed-shape matmul are independent), so a
            # resumed run (empty cache) sees bit-identical text states. One prompt at a time would be too, but on a GPU
            # its kernel launches cost more than the training step.
            chunk = missing[i : i + TEXT_ENCODE_CHUNK]
            padded = chunk + [chunk[-1]] * (TEXT_ENCODE_CHUNK - len(chunk))
            states, masks = encode_prompts(self.text_conditioner, padded)
            states, masks = [s.cpu() for s in states], [m.cpu() for m in masks]
            for j, p in enumerate(chunk):
                cache[p] = ([s[j].clone() for s in states], [m[j].clone() for m in masks])
        for p in prompts:
            cache.move_to_end(p)
        rows = [cache[p] for p in prompts]
        while len(cache) > self.text_cache_size:
            cache.popitem(last=False)
        n = len(rows[0][0])
        states = [torch.stack([r[0][i] for r in rows]) for i in range(n)]
        masks = [torch.stack([r[1][i] for r in rows]) for i in range(n)]
        return states, masks

    def noisy_batch(self, batch: dict):
        """(x_t, t, velocity target, text states, text masks) for a batch: latents, caption dropout, timesteps
        and noise, all drawn from self.generator in this order.

        A batch with counterfactual partners (`pair_image`, `pair_caption`: the same layout with one bound thing
        changed, ShapesDataset(pairs=True)) is doubled: each partner follows the batch with the same timestep and
        noise as its item, so at high noise the two inputs are nearly equal and only the captions tell the model
        which target is which (docs/training.md: a loss on one image cannot start binding)."""
        x0 = self.latents(batch)
        captions = list(batch["caption"])
        paired = "pair_image" in batch
        if paired:
            x0 = torch.cat([x0, self.latents({"image": batch["pair_image"]})])
            captions += list(batch["pair_caption"])
        b = x0.shape[0] // 2 if paired else x0.shape[0]
        states, masks = self.text(captions)
        t = flow.sample_timesteps(
            b, None, self.generator, mean=self.logit_mean, std=self.logit_std, shift=self.shift
        ).to(x0.device)
        noise = torch.randn((b, *x0.shape[1:]), generator=self.generator).to(x0.device)
        if paired:
            t, noise = torch.cat([t, t]), torch.cat([noise, noise])
        x_t = flow.add_noise(x0, noise, t)
        target = flow.velocity_target(x0, noise)
        if len(states) == 1:
            states, masks = states[0], masks[0]
        return x_t, t, target, states, masks

    def step(self, batch: dict) -> dict:
        x_t, t, target, states, masks = self.noisy_batch(batch)
        pred = self.model(x_t, t, states, masks).sample
        per_sample = (pred.float() - target.float()).square().flatten(1).mean(1)
        loss = per_sample.mean()
        out = {"loss": loss}
        if self.contrastive[0] > 0 and "negative_caption" in batch:
            term, stats = self.contrastive_term(x_t, t, target, masks, per_sample, batch["negative_caption"])
            out.update(stats, flow_loss=loss.detach(), loss=loss + self.contrastive[0] * term)
        return out

    def contrastive_term(self, x_t, t, target, masks, per_sample, negative_captions):
        """Hinge on the relative loss gap between a wrong caption and the true one, on the same x_t and t:
        mean over kept captions with t >= min_t of relu(margin - (L_wrong - L_true) / sg(L_true)).

        Why: with plain flow matching a shapes model learns which words a prompt has but not what binds them
        (swapping two objects' colours or reversing a relation moves its loss by < 1%, docs/training.md); this
        term asks the model to pay a price when it is told the wrong binding. The wrong captions come from the
        dataset (`negatives: true`: the same scene with one bound thing changed, in the same template); they are
        encoded without caption dropout, so the random stream is that of plain training."""
        _, margin, min_t = self.contrastive
        with torch.no_grad():
            neg_states, neg_masks = self._encode_cached(list(negative_captions))
        device = self.device
        neg_states, neg_masks = [s.to(device) for s in neg_states], [m.to(device) for m in neg_masks]
        if len(neg_states) == 1:
            neg_states, neg_masks = neg_states[0], neg_masks[0]
        neg = self.model(x_t, t, neg_states, neg_masks).sample
        per_neg = (neg.float() - target.float()).square().flatten(1).mean(1)
        ms = masks if isinstance(masks, (list, tuple)) else [masks]
        kept = torch.stack([m.any(dim=1) for m in ms]).any(dim=0)  # caption dropout left the prompt in
        valid = (kept & (t >= min_t)).float()
        gap = (per_neg - per_sample) / per_sample.detach().clamp_min(1e-8)
        hinge = F.relu(margin - gap)
        n = valid.sum().clamp_min(1.0)
        term = (hinge * valid).sum() / n
        stats = {"contrast_gap": ((gap * valid).sum() / n).detach(),
                 "contrast_active": (((hinge > 0).float() * valid).sum() / n).detach()}
        return term, stats
