"""Self-distillation of a palettized PocketDiT against the unquantized model (SnapGen++ Supp. C).

`self_distill_` fine-tunes what palettization left in floating point (biases, norms, modulation tables) to
match the float model's velocity on calibration batches, optionally the LUT entries too, and optionally
(quantization-aware, straight-through) which entry each weight uses.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..flow import classifier_free_guidance
from .palettize import _nearest_entry


def _guided(velocity: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on a batch stacked as [conditional; unconditional]."""
    return classifier_free_guidance(*velocity.chunk(2), scale)


def self_distill_(
    student: nn.Module,
    teacher: nn.Module,
    calibration: Sequence[dict],
    steps: int = 200,
    lr: float = 1e-4,
    train_luts: bool = False,
    train_indices: bool = False,
    guidance_scale: Optional[float] = None,
    progress: bool = True,
) -> list[float]:
    """Fine-tune the palettized student to match the unquantized teacher's velocity (paper Supp. C).

    Biases, norms, modulation tables and any layer left in float are trained with MSE to the teacher on the
    calibration batches. Palettized weights keep their indices; with train_luts=False (the paper's recipe)
    they are frozen, with train_luts=True their LUT entries are trained too (each weight is lut[index], so
    the gradient of an entry is the sum over the weights that use it) and rounded to fp16 at the end; the
    model stays a valid palettized model with the same number of values per layer. train_indices=True
    (implies train_luts) is quantization-aware training: each palettized layer keeps a latent float weight
    (initialised from GPTQ's compensated weight `palettized_latent` if quantize_ left one, else from the
    teacher's), every step assigns it to its nearest LUT entry and the gradient passes straight through
    the rounding to the latent weight, so weights can change entry; at the end the indices are the nearest
    fp16 entries. guidance_scale=w: each calibration batch stacks a conditional first half
    and an unconditional second half on the same latents (`trajectory_calibration`'s batches), and the loss
    adds the error of the guided velocity v_u + w (v_c - v_u) that the sampler integrates, which weighs
    the two branches' errors as sampling does. Returns the loss per step.
    """
    from torch.func import functional_call

    layers = {n: m for n, m in student.named_modules() if hasattr(m, "palettized_weight")}
    palettized = {id(m.weight) for m in layers.values()}
    trainable = [p for p in student.parameters() if id(p) not in palettized]
    luts, latents = {}, {}
    if train_luts or train_indices:
        luts = {n: nn.Parameter(m.palettized_weight.lut.clone()) for n, m in layers.items()}
    if train_indices:
        teacher_params = dict(teacher.named_parameters())
        for n, m in layers.items():
            w = getattr(m, "palettized_latent", None)  # GPTQ assignment's compensated weight, if any
            if w is None:
                w = teacher_params.get(f"{n}.weight")
                w = w if w is not None and w.shape == m.weight.shape else m.weight
            latents[n] = nn.Parameter(w.detach().float().clone())
    if not trainable and not luts:
        raise ValueError("nothing to fine-tune: every parameter is palettized (pass train_luts=True)")
    flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) not in palettized)
    teacher.eval()
    with torch.no_grad():
        targets = [teacher(**b).sample for b in calibration]
    index_views = {n: m.palettized_weight.indices.long().reshape(m.palettized_weight.lut.shape[0], -1) for n, m in layers.items()}

    def weights_from_luts():
        weights = {}
        for n, lut in luts.items():
            if n in latents:
                latent = latents[n].reshape(lut.shape[0], -1)
                index_views[n] = _nearest_entry(latent.detach(), lut.detach())
                # straight-through: forward uses lut[index], backward reaches both the LUT and the latent
                w = torch.gather(lut, 1, index_views[n]) + (latent - latent.detach())
            else:
                w = torch.gather(lut, 1, index_views[n])
            weights[f"{n}.weight"] = w.reshape(layers[n].weight.shape).to(layers[n].weight.dtype)
        return weights

    opt = torch.optim.AdamW(trainable + list(luts.values()) + list(latents.values()), lr=lr, weight_decay=0.0)
    # cosine decay to zero: the last steps settle instead of oscillating around the fp32 targets
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / steps)))
    losses = []
    from tqdm.auto import tqdm

    was_training = student.training
    student.train()
    bar = tqdm(range(steps), desc="self-distillation", disable=not progress, leave=False)
    try:
        order = []
        shuffle = torch.Generator().manual_seed(0)
        for step in bar:
            if not order:  # a fresh shuffled pass: trajectory batches come ordered by time step
                order = torch.randperm(len(calibration), generator=shuffle).tolist()
            i = order.pop()
            if luts:
                out = functional_call(student, weights_from_luts(), args=(), kwargs=calibration[i], strict=False)
            else:
                out = student(**calibration[i])
            loss = F.mse_loss(out.sample, targets[i])
            if guidance_scale is not None:
                loss = loss + F.mse_loss(_guided(out.sample, guidance_scale), _guided(targets[i], guidance_scale))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3g}")
    finally:
        student.train(was_training)
        for p in student.parameters():
            p.requires_grad_(flags[id(p)])
        with torch.no_grad():  # fp16 LUTs (what every runtime stores), and the dense weights to match
            for n, lut in luts.items():
                pw = layers[n].palettized_weight
                pw.lut = lut.detach().half().float()
                if n in latents:
                    pw.lut, _ = pw.lut.sort(dim=1)
                    idx = _nearest_entry(latents[n].detach().reshape(pw.lut.shape[0], -1), pw.lut)
                    pw.indices = idx.reshape(pw.indices.shape).to(pw.indices.dtype)
                layers[n].weight.data.copy_(pw.dequantize().to(layers[n].weight.dtype))
                if n in latents:  # a later call continues from here
                    layers[n].palettized_latent = latents[n].detach().clone()
    return losses
