"""Autoencoders: images in [-1, 1] <-> the latent space PocketDiT denoises.

Every autoencoder here has the same small interface:

    encode(images (B, 3, H, W) in [-1, 1]) -> latents (B, C, H/f, W/f), normalised to ~zero mean, unit variance
    decode(latents)                        -> images (B, 3, H, W) in [-1, 1]
    latent_channels: int    downsample_factor: int (f)    name: str (stable id, e.g. for latent caches)

* `PixelSpace`: the identity (3 channels, f = 1), for pixel-space models on small images.
* `TinyAutoencoder`: the project's own, trained with `pocketdit.train_ae.train_autoencoder` (`pocketdit
  train-ae`, the "autoencoder" method on the shared Trainer; `autoencoder_loss` below is its loss). The decoder
  follows SnapGen's tiny decoder recipe (no attention, depthwise-separable convolutions); the encoder is a
  plain small conv net since it only runs at training time. Latent normalisation is a per-channel mean/std
  fitted after training and stored as buffers in the safetensors file.
* `DiffusersAutoencoder`: AutoencoderKL (SD/SDXL/SD3/FLUX VAEs), AutoencoderTiny (TAESD), AutoencoderDC
  (DC-AE) or AutoencoderKLQwenImage (the Qwen-Image VAE SnapGen++ uses) from a local directory, normalised
  with the config's scaling/shift factors or per-channel latents_mean/latents_std.

`load_autoencoder(spec)` takes "pixel" or a local directory and returns the right one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from .utils import dir_fingerprint

__all__ = [
    "AutoencoderNotFoundError",
    "InvalidImageSizeError",
    "PixelSpace",
    "TinyAutoencoder",
    "TINY_AUTOENCODER_PRESETS",
    "DiffusersAutoencoder",
    "SUPPORTED_DIFFUSERS_AUTOENCODERS",
    "load_autoencoder",
    "autoencoder_loss",
]


class AutoencoderNotFoundError(FileNotFoundError):
    """An autoencoder spec that points at nothing loadable (missing directory, no config, unknown class)."""


class InvalidImageSizeError(ValueError):
    """Images whose height/width the autoencoder cannot process (not a multiple of its downsample factor)."""


def _check_images(images: torch.Tensor, channels: int, factor: int, who: str):
    if not torch.is_tensor(images) or images.dim() != 4:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"{who}.encode expects images of shape (B, {channels}, H, W), got {shape}")
    if images.shape[1] != channels:
        raise ValueError(f"{who}.encode expects {channels}-channel images, got {images.shape[1]} channels")
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        near = f"{max(factor, round(h / factor) * factor)}x{max(factor, round(w / factor) * factor)}"
        raise InvalidImageSizeError(
            f"image size {h}x{w} is not a multiple of {who}'s downsample factor {factor}; resize or crop to a "
            f"multiple of {factor} (e.g. {near})"
        )


def _check_latents(latents: torch.Tensor, channels: int, who: str):
    if not torch.is_tensor(latents) or latents.dim() != 4 or latents.shape[1] != channels:
        shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
        raise ValueError(f"{who}.decode expects latents of shape (B, {channels}, h, w), got {shape}")


class _LatentSpaceMixin:
    """Shape helpers shared by every autoencoder."""

    latent_channels: int
    downsample_factor: int

    def latent_shape(self, height: int, width: int) -> tuple:
        """(C, h, w) of the latents for an image of height x width (which must be a multiple of the factor)."""
        f = self.downsample_factor
        if height % f or width % f:
            raise InvalidImageSizeError(f"image size {height}x{width} is not a multiple of the downsample factor {f}")
        return (self.latent_channels, height // f, width // f)


# ----------------------------------------------------------------------------------------------------
# Pixel space
# ----------------------------------------------------------------------------------------------------
class PixelSpace(_LatentSpaceMixin, ModelMixin, ConfigMixin):
    """The identity 'autoencoder': the model denoises RGB pixels in [-1, 1] directly.

    No weights: as a pipeline component `save_pretrained` writes only `config.json` (`_class_name` PixelSpace).
    """

    config_name = "config.json"
    latent_channels = 3
    downsample_factor = 1
    name = "pixel"

    @register_to_config
    def __init__(self):
        super().__init__()

    # No parameters to ask (ModelMixin's dtype/device look at parameters; DiffusionPipeline.to asks for them).
    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs):
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        self.save_config(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike, None] = None, **kwargs) -> "PixelSpace":
        """The config in the directory is checked; loading kwargs (torch_dtype, device_map, ...) do not apply."""
        if pretrained_model_name_or_path is not None:
            path = Path(pretrained_model_name_or_path) / "config.json"
            if not path.is_file() or _read_config(path.parent).get("_class_name") != "PixelSpace":
                raise AutoencoderNotFoundError(f"{path} does not describe a PixelSpace autoencoder")
        return cls()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, 3, 1, "PixelSpace")
        return images.float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _check_latents(latents, 3, "PixelSpace")
        return latents.float().clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------
# The project's tiny autoencoder
# ----------------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """Encoder block: GN-SiLU-conv3x3 twice, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class SeparableResBlock(nn.Module):
    """Decoder block (SnapGen-style): depthwise 3x3 for space, two pointwise 1x1 (expand, project) for channels."""

    def __init__(self, channels: int, groups: int, expansion: int = 2):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pointwise_in = nn.Conv2d(channels, channels * expansion, 1)
        self.pointwise_out = nn.Conv2d(channels * expansion, channels, 1)

    def forward(self, x):
        h = self.depthwise(F.silu(self.norm(x)))
        return x + self.pointwise_out(F.silu(self.pointwise_in(h)))


class TinyEncoder(nn.Module):
    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        for i, ch in enumerate(block_out_channels):
            self.blocks.append(nn.Sequential(*[ResBlock(ch, groups) for _ in range(layers_per_block)]))
            if i < len(block_out_channels) - 1:
                self.downsamplers.append(nn.Conv2d(ch, block_out_channels[i + 1], 3, stride=2, padding=1))
        self.norm_out = nn.GroupNorm(groups, block_out_channels[-1])
        self.conv_out = nn.Conv2d(block_out_channels[-1], latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.downsamplers):
                x = self.downsamplers[i](x)
        return self.conv_out(F.silu(self.norm_out(x)))


class TinyDecoder(nn.Module):
    def __init__(self, latent_channels, out_channels, block_out_channels, layers_per_block, groups):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, block_out_channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i, ch in enumerate(block_out_channels):
            self.blocks.append(nn.Sequential(*[SeparableResBlock(ch, groups) for _ in range(layers_per_block)]))
            if i < len(block_out_channels) - 1:
                nxt = block_out_channels[i + 1]
                # Reduce channels before upsampling (4x cheaper), then a depthwise 3x3 smooths nearest-neighbour blocks.
                self.upsamplers.append(nn.Sequential(
                    nn.Conv2d(ch, nxt, 1),
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(nxt, nxt, 3, padding=1, groups=nxt),
                ))
        self.norm_out = nn.GroupNorm(groups, block_out_channels[-1])
        self.conv_out = nn.Conv2d(block_out_channels[-1], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.upsamplers):
                x = self.upsamplers[i](x)
        return self.conv_out(F.silu(self.norm_out(x)))


TINY_AUTOENCODER_PRESETS = {
    # 64x64 images -> 4x16x16 latents: matches the "nano"/test-scale PocketDiT (in_channels=4).
    "f4c4": dict(latent_channels=4, encoder_block_out_channels=(32, 64, 128), decoder_block_out_channels=(128, 64, 32)),
    # 8x downsampling, 16 channels: the Qwen-Image VAE's latent shape (the SnapGen++ setting), tiny decoder.
    "f8c16": dict(latent_channels=16, encoder_block_out_channels=(32, 64, 128, 256),
                  decoder_block_out_channels=(128, 64, 32, 16), decoder_layers_per_block=2),
}


class TinyAutoencoder(_LatentSpaceMixin, ModelMixin, ConfigMixin):
    """A small deterministic conv autoencoder with a SnapGen-style decoder and per-channel latent normalisation.

    Downsample factor = 2 ** (len(encoder_block_out_channels) - 1). `encode` returns normalised latents
    ((z - latents_mean) / latents_std, per channel); `encode_raw` / `decode_raw` skip the normalisation (used
    in training). `fit_latent_normalization(batches)` sets the statistics (train_autoencoder does it at the end).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 4,
        encoder_block_out_channels: Sequence[int] = (32, 64, 128),
        decoder_block_out_channels: Sequence[int] = (128, 64, 32),
        encoder_layers_per_block: int = 1,
        decoder_layers_per_block: int = 1,
        norm_num_groups: int = 8,
    ):
        super().__init__()
        enc, dec = list(encoder_block_out_channels), list(decoder_block_out_channels)
        for key, value in [("in_channels", in_channels), ("latent_channels", latent_channels),
                           ("encoder_layers_per_block", encoder_layers_per_block),
                           ("decoder_layers_per_block", decoder_layers_per_block),
                           ("norm_num_groups", norm_num_groups)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TinyAutoencoder config {key} must be a positive int, got {value!r}")
        if not enc or not all(isinstance(c, int) and c > 0 for c in enc):
            raise ValueError(f"encoder_block_out_channels must be positive ints, got {encoder_block_out_channels!r}")
        if len(dec) != len(enc) or not all(isinstance(c, int) and c > 0 for c in dec):
            raise ValueError(
                f"decoder_block_out_channels must be {len(enc)} positive ints (one per encoder level), got "
                f"{decoder_block_out_channels!r}"
            )
        for key, chans in [("encoder_block_out_channels", enc), ("decoder_block_out_channels", dec)]:
            bad = [c for c in chans if c % norm_num_groups]
            if bad:
                raise ValueError(f"{key} {chans} must be multiples of norm_num_groups={norm_num_groups} (got {bad})")
        self.encoder = TinyEncoder(in_channels, latent_channels, enc, encoder_layers_per_block, norm_num_groups)
        self.decoder = TinyDecoder(latent_channels, in_channels, dec, decoder_layers_per_block, norm_num_groups)
        # Identity until fitted; saved in the safetensors file with the weights.
        self.register_buffer("latents_mean", torch.zeros(latent_channels))
        self.register_buffer("latents_std", torch.ones(latent_channels))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "TinyAutoencoder":
        """Load from a local directory only (never the hub); clear error when it is missing."""
        path = _resolve_model_dir(pretrained_model_name_or_path, "TinyAutoencoder")
        kwargs.setdefault("low_cpu_mem_usage", _low_cpu_mem_usage())
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "TinyAutoencoder":
        if name not in TINY_AUTOENCODER_PRESETS:
            raise ValueError(f"unknown TinyAutoencoder preset {name!r}; choose from {sorted(TINY_AUTOENCODER_PRESETS)}")
        return cls(**{**TINY_AUTOENCODER_PRESETS[name], **overrides})

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.encoder_block_out_channels) - 1)

    @property
    def name(self) -> str:
        """Architecture + a hash of the current weights and normalisation (a stable latent-cache key)."""
        c = self.config
        h = hashlib.sha256()
        for key, t in self.state_dict().items():
            h.update(key.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return f"tiny-ae-f{self.downsample_factor}c{c.latent_channels}-{h.hexdigest()[:8]}"

    @property
    def normalization_fitted(self) -> bool:
        return not (torch.all(self.latents_mean == 0) and torch.all(self.latents_std == 1))

    def _stats(self, like: torch.Tensor):
        return (self.latents_mean.to(like)[None, :, None, None], self.latents_std.to(like)[None, :, None, None])

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.config.in_channels, self.downsample_factor, "TinyAutoencoder")
        p = next(self.parameters())
        return self.encoder(images.to(device=p.device, dtype=p.dtype))

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        _check_latents(latents, self.latent_channels, "TinyAutoencoder")
        p = next(self.parameters())
        return self.decoder(latents.to(device=p.device, dtype=p.dtype))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.encode_raw(images).float()
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _check_latents(latents, self.latent_channels, "TinyAutoencoder")
        latents = latents.float()
        mean, std = self._stats(latents)
        return self.decode_raw(latents * std + mean).float().clamp(-1, 1)

    def forward(self, images: torch.Tensor):
        """Raw reconstruction for training: returns (reconstruction, raw latents)."""
        z = self.encode_raw(images)
        return self.decoder(z), z

    @torch.no_grad()
    def fit_latent_normalization(self, batches: Iterable[torch.Tensor], eps: float = 1e-6):
        """Per-channel mean/std of the raw latents over `batches` (image tensors in [-1, 1]); stored as buffers."""
        count, total, total_sq = 0, None, None
        for images in batches:
            z = self.encode_raw(images).double()
            per_channel = z.transpose(0, 1).reshape(z.shape[1], -1)
            total = per_channel.sum(1) if total is None else total + per_channel.sum(1)
            total_sq = per_channel.pow(2).sum(1) if total_sq is None else total_sq + per_channel.pow(2).sum(1)
            count += per_channel.shape[1]
        if count == 0:
            raise ValueError("fit_latent_normalization got no images")
        mean = total / count
        std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(eps)
        self.latents_mean.copy_(mean.to(self.latents_mean))
        self.latents_std.copy_(std.to(self.latents_std))
        return self.latents_mean.clone(), self.latents_std.clone()


# ----------------------------------------------------------------------------------------------------
# Diffusers VAEs from a local directory
# ----------------------------------------------------------------------------------------------------
SUPPORTED_DIFFUSERS_AUTOENCODERS = ("AutoencoderKL", "AutoencoderTiny", "AutoencoderDC", "AutoencoderKLQwenImage")


def _low_cpu_mem_usage() -> bool:
    # diffusers' default needs accelerate and warns loudly without it; only ask for it when it is installed.
    import importlib.util

    return importlib.util.find_spec("accelerate") is not None

def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path / 'config.json')!r} is not valid JSON: {e}") from e


def _resolve_model_dir(path: Union[str, os.PathLike], what: str) -> Path:
    """A model directory, or a pipeline directory with a vae/ subfolder; clear errors otherwise."""
    p = Path(path).expanduser()
    if not p.exists():
        raise AutoencoderNotFoundError(
            f"autoencoder directory {str(p)!r} does not exist. Pass 'pixel', a directory written by "
            f"`pocketdit train-ae` / TinyAutoencoder.save_pretrained, or a local diffusers {what} directory "
            "(config.json + diffusion_pytorch_model.safetensors)"
        )
    if not p.is_dir():
        raise AutoencoderNotFoundError(f"autoencoder path {str(p)!r} is a file; pass the directory that holds it")
    if not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
        p = p / "vae"  # a diffusers pipeline folder
    if not (p / "config.json").is_file():
        raise AutoencoderNotFoundError(
            f"{str(p)!r} is not an autoencoder directory: expected config.json and "
            "diffusion_pytorch_model.safetensors (or a vae/ subfolder holding them)"
        )
    if not any(f.name.startswith("diffusion_pytorch_model") for f in p.iterdir()):
        raise AutoencoderNotFoundError(
            f"{str(p)!r} has a config.json but no weights: expected diffusion_pytorch_model.safetensors"
        )
    return p


class DiffusersAutoencoder(_LatentSpaceMixin, ModelMixin):
    """A diffusers VAE behind the PocketDiT autoencoder interface, with its latent normalisation applied.

    normalised = (z - shift) * scale, per channel where the config has latents_mean/latents_std:
      * AutoencoderKL: shift = shift_factor (or latents_mean), scale = scaling_factor (/ latents_std).
      * AutoencoderTiny: shift = shift_factor, scale = scaling_factor (TAESD latents are already ~unit scale).
      * AutoencoderDC: scale = scaling_factor.
      * AutoencoderKLQwenImage: shift = latents_mean, scale = 1 / latents_std; its latents are video-shaped
        (B, C, T, H, W) and images are run as one frame (T = 1).
    KL-family encoders return the posterior mode unless `sample_posterior=True` (then pass a generator).

    As a pipeline component `save_pretrained(dir)` saves the wrapped VAE itself there (its own config.json +
    weights, so the pipeline directory is self-contained) and `from_pretrained(dir)` loads it back.
    """

    def __init__(self, vae: nn.Module, name: Optional[str] = None, sample_posterior: bool = False):
        super().__init__()
        cls = type(vae).__name__
        if cls not in SUPPORTED_DIFFUSERS_AUTOENCODERS:
            raise TypeError(f"unsupported autoencoder class {cls}; supported: {', '.join(SUPPORTED_DIFFUSERS_AUTOENCODERS)}")
        self.vae = vae.eval().requires_grad_(False)
        self.kind = cls
        self.sample_posterior = sample_posterior
        cfg = vae.config
        self.is_video = cls == "AutoencoderKLQwenImage"
        if cls == "AutoencoderKLQwenImage":
            self._latent_channels = cfg.z_dim
        else:
            self._latent_channels = cfg.latent_channels
        if hasattr(vae, "spatial_compression_ratio"):
            self._factor = int(vae.spatial_compression_ratio)
        elif cls == "AutoencoderKL":
            self._factor = 2 ** (len(cfg.block_out_channels) - 1)
        else:  # AutoencoderTiny: one stride-2 conv per encoder block after the first
            self._factor = 2 ** (len(cfg.encoder_block_out_channels) - 1)

        c = self._latent_channels
        shift, scale = torch.zeros(c), torch.ones(c)
        mean = getattr(cfg, "latents_mean", None)
        std = getattr(cfg, "latents_std", None)
        if cls == "AutoencoderKLQwenImage":
            shift, scale = torch.tensor(mean, dtype=torch.float32), 1.0 / torch.tensor(std, dtype=torch.float32)
        elif mean is not None and std is not None:  # SDXL-style per-channel statistics
            shift = torch.tensor(mean, dtype=torch.float32)
            scale = float(getattr(cfg, "scaling_factor", 1.0) or 1.0) / torch.tensor(std, dtype=torch.float32)
        else:
            shift = shift + float(getattr(cfg, "shift_factor", None) or 0.0)
            scale = scale * float(getattr(cfg, "scaling_factor", None) or 1.0)
        if shift.numel() != c or scale.numel() != c:
            raise ValueError(f"latents_mean/latents_std in the {cls} config need {c} entries (one per latent channel)")
        self.register_buffer("latent_shift", shift, persistent=False)
        self.register_buffer("latent_scale", scale, persistent=False)
        self.name = name or f"{cls}-f{self._factor}c{c}"

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs):
        """The wrapped VAE's save_pretrained (kwargs such as safe_serialization go to it)."""
        self.vae.save_pretrained(save_directory, **kwargs)

    @classmethod
    def from_pretrained(cls, local_dir: Union[str, os.PathLike], torch_dtype: Optional[torch.dtype] = None,
                        sample_posterior: bool = False, **kwargs) -> "DiffusersAutoencoder":
        """A local VAE directory (or a pipeline folder with vae/). Other loading kwargs that DiffusionPipeline
        passes to every model (device_map, variant, ...) are ignored."""
        import diffusers

        torch_dtype = torch.float32 if torch_dtype is None else torch_dtype

        path = _resolve_model_dir(local_dir, "/".join(SUPPORTED_DIFFUSERS_AUTOENCODERS))
        config = _read_config(path)
        class_name = config.get("_class_name")
        if class_name not in SUPPORTED_DIFFUSERS_AUTOENCODERS:
            raise AutoencoderNotFoundError(
                f"{str(path / 'config.json')!r} names _class_name={class_name!r}; supported diffusers autoencoders "
                f"are {', '.join(SUPPORTED_DIFFUSERS_AUTOENCODERS)} (or a TinyAutoencoder)"
            )
        vae = getattr(diffusers, class_name).from_pretrained(path, torch_dtype=torch_dtype,
                                                          low_cpu_mem_usage=_low_cpu_mem_usage())
        folder = path.resolve().parent.name if path.name == "vae" else path.resolve().name
        return cls(vae, name=f"{folder}-{class_name}-{dir_fingerprint(path)}", sample_posterior=sample_posterior)

    @property
    def latent_channels(self) -> int:
        return self._latent_channels

    @property
    def downsample_factor(self) -> int:
        return self._factor

    def train(self, mode: bool = True):
        return super().train(False)  # frozen

    def _param(self):
        return next(self.vae.parameters())

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        _check_images(images, 3, self._factor, self.kind)
        p = self._param()
        x = images.to(device=p.device, dtype=p.dtype)
        if self.is_video:
            x = x.unsqueeze(2)
        out = self.vae.encode(x)
        if hasattr(out, "latent_dist"):
            dist = out.latent_dist
            z = dist.sample(generator) if self.sample_posterior else dist.mode()
        elif hasattr(out, "latents"):  # AutoencoderTiny
            z = out.latents
        else:  # AutoencoderDC
            z = out.latent
        if self.is_video:
            z = z[:, :, 0]
        z = z.float()
        return (z - self.latent_shift.to(z)[None, :, None, None]) * self.latent_scale.to(z)[None, :, None, None]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        _check_latents(latents, self._latent_channels, self.kind)
        z = latents.float() / self.latent_scale.to(latents.device)[None, :, None, None]
        z = z + self.latent_shift.to(latents.device)[None, :, None, None]
        p = self._param()
        z = z.to(device=p.device, dtype=p.dtype)
        if self.is_video:
            z = z.unsqueeze(2)
        images = self.vae.decode(z).sample
        if self.is_video:
            images = images[:, :, 0]
        return images.float().clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------
# Loading by spec
# ----------------------------------------------------------------------------------------------------
def load_autoencoder(spec: Union[str, os.PathLike], device: Union[str, torch.device, None] = None,
                     torch_dtype: torch.dtype = torch.float32):
    """"pixel" or a local directory (a TinyAutoencoder or a diffusers VAE, or a pipeline folder with vae/)."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise ValueError(f"autoencoder spec must be 'pixel' or a local directory, got {spec!r}")
    if str(spec).strip().lower() == "pixel":
        ae = PixelSpace()
    elif (Path(spec).expanduser() / "config.json").is_file() and _read_config(Path(spec).expanduser()).get(
            "_class_name") == "PixelSpace":  # a pipeline's autoencoder/ folder
        ae = PixelSpace()
    else:
        path = _resolve_model_dir(spec, "/".join(SUPPORTED_DIFFUSERS_AUTOENCODERS))
        class_name = _read_config(path).get("_class_name")
        if class_name == "TinyAutoencoder":
            ae = TinyAutoencoder.from_pretrained(path, torch_dtype=torch_dtype)
            ae = ae.eval().requires_grad_(False)
            if not ae.normalization_fitted:
                import warnings

                warnings.warn(f"TinyAutoencoder in {str(path)!r} has no fitted latent normalisation (mean 0, std 1); "
                              "its latents may not have unit variance", stacklevel=2)
        else:
            ae = DiffusersAutoencoder.from_pretrained(path, torch_dtype=torch_dtype)
    return ae.to(device) if device is not None else ae


# ----------------------------------------------------------------------------------------------------
# The tiny autoencoder's training loss (the training itself: pocketdit.train_ae)
# ----------------------------------------------------------------------------------------------------
def image_gradients(x: torch.Tensor):
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def autoencoder_loss(recon: torch.Tensor, target: torch.Tensor, latents: Optional[torch.Tensor] = None,
                     edge_weight: float = 0.5, latent_l2_weight: float = 1e-4) -> dict:
    """L1 + edge (L1 between image gradients, which keeps edges sharp without a perceptual net) + a small
    L2 on raw latents (keeps their scale bounded so the fitted normalisation is stable)."""
    l1 = (recon - target).abs().mean()
    (rdx, rdy), (tdx, tdy) = image_gradients(recon), image_gradients(target)
    edge = (rdx - tdx).abs().mean() + (rdy - tdy).abs().mean()
    loss = l1 + edge_weight * edge
    out = {"l1": l1.detach(), "edge": edge.detach()}
    if latents is not None and latent_l2_weight > 0:
        reg = latents.float().pow(2).mean()
        loss = loss + latent_l2_weight * reg
        out["latent_l2"] = reg.detach()
    out["loss"] = loss
    return out
