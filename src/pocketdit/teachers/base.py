"""The teacher contract: what knowledge distillation (methods/kd.py) and K-DMD ask of a teacher.

Everything is in PocketDiT's units, whatever the teacher's own conventions are:

    out = teacher(x_t, t, prompts, guidance_scale=1.0, output_features=True)
    out.velocity   (B, C, H, W)  v = noise - x0 on the student's latent grid (x_t = (1 - t) x0 + t noise), fp32
    out.features   (B, N, D)     the teacher's final transformer-layer tokens (conditional branch), fp32
    out.feature_grid  (gh, gw)   the token grid of `features` (N = gh * gw), for the KD projector to align grids

`x_t` is in the student's (normalised) latent space and `t` in [0, 1] (1 = pure noise). A prompt may be None:
the teacher's own unconditional input (what caption dropout trains the student's null condition to match). An adapter owns the
teacher's conventions (timestep scale, latent packing, normalisation, guidance rule) and converts both ways.
Teachers run without gradients, optionally in another dtype or on another device; their outputs come back on
`x_t`'s device in fp32. A teacher encodes the prompts with its own text encoders (`encode_prompts`, cached per
prompt list by the caller if it wants).

A teacher whose latent space differs from the student's is an error (`check_latent_space`) unless the user says
the two share an autoencoder (`shared_autoencoder=True`), e.g. the same VAE saved twice in other dtypes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = [
    "Teacher",
    "TeacherOutput",
    "LatentSpaceMismatchError",
    "latent_space_signature",
    "check_latent_space",
    "register_teacher",
    "TEACHERS",
]


class LatentSpaceMismatchError(ValueError):
    """The teacher denoises another latent space than the student's autoencoder produces."""


@dataclass
class TeacherOutput:
    velocity: torch.Tensor
    features: Optional[torch.Tensor] = None
    feature_grid: Optional[tuple] = None


class Teacher(nn.Module):
    """Base class of teacher adapters. Subclasses set `latent_channels`, `feature_dim`, `patch_multiple`, call
    `hold_autoencoder(ae)` with the autoencoder whose latents they denoise (None when unknown), and implement
    `encode_prompts` and `predict`."""

    latent_channels: int
    feature_dim: int
    #: latent height/width must be multiples of this (patch size and packing)
    patch_multiple: int = 1
    #: the guidance rule the teacher applies in `predict` ("cfg", "cfg-renorm" for Qwen-Image's true CFG, ...)
    guidance_rule: str = "cfg"

    def __init__(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.run_device = None if device is None else torch.device(device)
        self.run_dtype = dtype

    @property
    def autoencoder(self):
        """The autoencoder whose latents this teacher denoises (held, not a submodule: the teacher never runs it)."""
        return self.__dict__.get("_autoencoder")

    def hold_autoencoder(self, ae) -> None:
        """Record the teacher's autoencoder (nn.Module assignment would register it as a submodule)."""
        self.__dict__["_autoencoder"] = ae

    # -- to implement ------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """The teacher's own text conditioning for `prompts` (conditional and, for guidance, unconditional)."""
        raise NotImplementedError

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any, guidance_scale: float = 1.0,
                output_features: bool = False) -> TeacherOutput:
        """Velocity (and features) in PocketDiT units for inputs already on the teacher's device and dtype."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        if self.run_device is not None:
            return self.run_device
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        if self.run_dtype is not None:
            return self.run_dtype
        p = next(self.parameters(), None)
        return p.dtype if p is not None else torch.float32

    def check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, prompts) -> torch.Tensor:
        if x_t.ndim != 4:
            raise ValueError(f"x_t must be (B, C, H, W), got shape {tuple(x_t.shape)}")
        b, c, h, w = x_t.shape
        if c != self.latent_channels:
            raise LatentSpaceMismatchError(
                f"the teacher ({type(self).__name__}) denoises {self.latent_channels}-channel latents, the student's "
                f"have {c}: they are not the same latent space"
            )
        m = self.patch_multiple
        if h % m or w % m:
            raise ValueError(f"latent size {h}x{w}: {type(self).__name__} needs multiples of {m}")
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        t = t.expand(b) if t.ndim == 0 else t
        if t.shape != (b,) or not torch.all((t >= 0) & (t <= 1)):
            raise ValueError(f"t must be one value or (B,) values in [0, 1], got {tuple(t.shape)}")
        if prompts is not None and len(prompts) != b:
            raise ValueError(f"{len(prompts)} prompts for a batch of {b}")
        return t

    @torch.no_grad()
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, prompts: Optional[Sequence[str]] = None,
                guidance_scale: float = 1.0, output_features: bool = False, cond: Any = None) -> TeacherOutput:
        """Run the teacher on (x_t, t) for `prompts` (or a `cond` from `encode_prompts`)."""
        t = self.check_inputs(x_t, t, prompts if cond is None else None)
        if cond is None:
            if prompts is None:
                raise ValueError("pass prompts or cond")
            cond = self.encode_prompts(list(prompts))
        out = self.predict(x_t.to(self.device, self.dtype), t.to(self.device), cond, float(guidance_scale),
                           output_features)
        velocity = out.velocity.to(x_t.device, torch.float32)
        features = None if out.features is None else out.features.to(x_t.device, torch.float32)
        if velocity.shape != x_t.shape:
            raise RuntimeError(f"{type(self).__name__} returned velocity {tuple(velocity.shape)} for x_t {tuple(x_t.shape)}")
        return TeacherOutput(velocity, features, out.feature_grid)

    def train(self, mode: bool = True):
        return super().train(False)  # a teacher is always in eval mode


# ----------------------------------------------------------------------------------------------------
# Latent spaces
# ----------------------------------------------------------------------------------------------------
def latent_space_signature(autoencoder) -> str:
    """A string that is equal for two autoencoders that produce the same latents: the class, the latent layout
    and a hash of the weights and buffers (normalisation statistics included)."""
    if autoencoder is None:
        return "unknown"
    name = type(autoencoder).__name__
    if name == "PixelSpace":
        return "pixel"
    h = hashlib.sha1()
    state = autoencoder.state_dict() if hasattr(autoencoder, "state_dict") else {}
    for k in sorted(state):
        v = state[k]
        if torch.is_tensor(v):
            h.update(k.encode())
            h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    for attr in ("latent_shift", "latent_scale"):  # DiffusersAutoencoder's non-persistent normalisation
        v = getattr(autoencoder, attr, None)
        if torch.is_tensor(v):
            h.update(v.detach().cpu().float().numpy().tobytes())
    return f"{name}:{getattr(autoencoder, 'latent_channels', '?')}:{h.hexdigest()[:16]}"


def check_latent_space(teacher: Teacher, student_autoencoder, shared_autoencoder: bool = False) -> None:
    """A LatentSpaceMismatchError unless the teacher denoises the student's latent space (or the user says so)."""
    if shared_autoencoder:
        return
    s_channels = getattr(student_autoencoder, "latent_channels", None)
    if s_channels is not None and s_channels != teacher.latent_channels:
        raise LatentSpaceMismatchError(
            f"the teacher ({type(teacher).__name__}) denoises {teacher.latent_channels}-channel latents and the "
            f"student's autoencoder makes {s_channels}-channel ones; train the student on the teacher's autoencoder"
        )
    a, b = latent_space_signature(teacher.autoencoder), latent_space_signature(student_autoencoder)
    if a != b:
        raise LatentSpaceMismatchError(
            f"the teacher ({type(teacher).__name__}) denoises the latents of autoencoder {a}, the student is trained on "
            f"{b}. Train the student on the teacher's autoencoder (config autoencoder: <the teacher's vae directory>), "
            "or, if the two are the same autoencoder saved differently, set method.shared_autoencoder: true"
        )


# ----------------------------------------------------------------------------------------------------
# Registry: teacher kinds by name, for load_teacher
# ----------------------------------------------------------------------------------------------------
TEACHERS: dict[str, Callable] = {}


def register_teacher(name: str):
    def deco(cls):
        TEACHERS[name] = cls
        return cls

    return deco
