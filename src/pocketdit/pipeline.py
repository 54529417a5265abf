"""PocketDiTPipeline: prompt -> image. Text conditioner + PocketDiT + flow sampler + autoencoder decoder.

    pipe = PocketDiTPipeline.from_pretrained("my-pipeline")          # or from a training run / checkpoint
    images = pipe(["a red circle"], num_steps=20, guidance_scale=3.0, height=32, width=32, seed=0)

On disk (diffusers-like):
    my-pipeline/
      pipeline.json        text encoder specs, autoencoder spec, sampling defaults
      transformer/         PocketDiT in diffusers layout (config.json + diffusion_pytorch_model.safetensors)
      autoencoder/         only for autoencoders that are saved with the pipeline (e.g. TinyAutoencoder)

Classifier-free guidance: the unconditional branch gives the model all-False text masks, so it attends
only to its learned null token - exactly the input caption dropout produced during training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from . import flow

__all__ = ["PocketDiTPipeline", "make_grid", "tensor_to_pil"]

PIPELINE_FILE = "pipeline.json"


def tensor_to_pil(images: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> list of PIL RGB images."""
    from PIL import Image

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in x]


def make_grid(images, ncols: Optional[int] = None, scale: int = 1, pad: int = 2):
    """Tile PIL images into one PIL image (nearest-neighbour upscaled by `scale`, white padding)."""
    from PIL import Image

    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    w, h = images[0].size
    w, h = w * scale, h * scale
    grid = Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        if scale != 1:
            im = im.resize((w, h), Image.NEAREST)
        r, c = divmod(i, ncols)
        grid.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


def _text_specs(text_conditioner) -> list[str]:
    specs = []
    for enc in getattr(text_conditioner, "encoders", []):
        if type(enc).__name__ == "MiniLMEncoder":
            specs.append("minilm")
        else:
            path = getattr(enc, "path", None) or getattr(enc, "model_dir", None)
            if path is None:
                raise ValueError(
                    f"cannot record how to rebuild text encoder {enc.name!r}; pass text_specs= to PocketDiTPipeline"
                )
            specs.append(str(path))
    return specs


class PocketDiTPipeline:
    """Text-to-image sampling with a PocketDiT.

    Args:
        transformer: the PocketDiT.
        text_conditioner: `encode(prompts) -> (states list, masks list)`, with `.embed_dims`.
        autoencoder: `decode(latents) -> images in [-1, 1]`, with `latent_channels` and `downsample_factor`.
        text_specs / max_lengths: how to rebuild the text conditioner when saved (derived when possible).
        autoencoder_spec: "pixel" or a local directory; None = derived ("pixel", or saved in a subfolder).
        default_size, default_steps, default_guidance, default_shift: sampling defaults stored with the pipeline.
    """

    def __init__(
        self,
        transformer,
        text_conditioner,
        autoencoder,
        *,
        text_specs: Optional[Sequence[str]] = None,
        max_lengths: Optional[Sequence[int]] = None,
        autoencoder_spec: Optional[str] = None,
        default_size: Optional[int] = None,
        default_steps: int = 20,
        default_guidance: float = 3.0,
        default_shift: float = 1.0,
    ):
        self.transformer = transformer
        self.text_conditioner = text_conditioner
        self.autoencoder = autoencoder
        self.text_specs = list(text_specs) if text_specs is not None else None
        self.max_lengths = list(max_lengths) if max_lengths is not None else None
        self.autoencoder_spec = autoencoder_spec
        self.default_size = default_size
        self.default_steps = int(default_steps)
        self.default_guidance = float(default_guidance)
        self.default_shift = float(default_shift)
        dims = tuple(getattr(text_conditioner, "embed_dims", ()))
        if dims and tuple(transformer.config.text_embed_dims) != dims:
            raise ValueError(
                f"the transformer expects text widths {tuple(transformer.config.text_embed_dims)} but the text "
                f"conditioner gives {dims}"
            )
        if transformer.config.in_channels != autoencoder.latent_channels:
            raise ValueError(
                f"the transformer has {transformer.config.in_channels} input channels but the autoencoder "
                f"{getattr(autoencoder, 'name', '')!r} has {autoencoder.latent_channels} latent channels"
            )

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device):
        self.transformer.to(device)
        for part in (self.text_conditioner, self.autoencoder):
            if hasattr(part, "to"):
                part.to(device)
        return self

    # ------------------------------------------------------------------------------------------------
    def valid_image_sizes_near(self, height: int, width: int, count: int = 4) -> list[tuple[int, int]]:
        f = self.autoencoder.downsample_factor
        sizes = self.transformer.valid_latent_sizes_near(max(1, height // f), max(1, width // f), count)
        return [(h * f, w * f) for h, w in sizes]

    def check_image_size(self, height: int, width: int) -> tuple[int, int]:
        """Image size -> latent size; raises InvalidResolutionError listing nearby valid image sizes."""
        from .model import InvalidResolutionError

        f = self.autoencoder.downsample_factor
        near = ", ".join(f"{h}x{w}" for h, w in self.valid_image_sizes_near(height, width))
        if height <= 0 or width <= 0 or height % f or width % f:
            raise InvalidResolutionError(
                f"image size {height}x{width} is not valid: height and width must be positive multiples of the "
                f"autoencoder's downsample factor {f}. Nearest valid image sizes: {near}"
            )
        lh, lw = height // f, width // f
        try:
            self.transformer.check_latent_size(lh, lw)
        except InvalidResolutionError as e:
            raise InvalidResolutionError(
                f"image size {height}x{width} (latent {lh}x{lw}) is not valid for this model. "
                f"Nearest valid image sizes: {near}. ({e})"
            ) from None
        return lh, lw

    def _encode(self, prompts: list[str]):
        from .methods.pretrain import encode_prompts

        states, masks = encode_prompts(self.text_conditioner, prompts)
        dev = self.device
        return [s.to(dev) for s in states], [m.to(dev).bool() for m in masks]

    @torch.no_grad()
    def __call__(
        self,
        prompts: Union[str, Sequence[str]],
        num_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        seed: Union[int, Sequence[int], None] = 0,
        shift: Optional[float] = None,
        output_type: str = "pil",
        progress: bool = True,
        generator: Optional[torch.Generator] = None,
    ):
        """Generate one image per prompt. output_type "pil" (list of PIL images) or "pt" (tensor in [-1, 1]).

        `seed` is one integer for the batch, or one per prompt (image i's noise then depends only on seed[i],
        so an image does not change with the batch it is generated in). `generator` overrides `seed`.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        num_steps = self.default_steps if num_steps is None else int(num_steps)
        guidance_scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        shift = self.default_shift if shift is None else float(shift)
        size = self.default_size or 256
        height, width = height or size, width or size
        lh, lw = self.check_image_size(height, width)

        model = self.transformer
        was_training = model.training
        model.eval()
        dev = self.device
        states, masks = self._encode(prompts)
        b = len(prompts)
        null_masks = [torch.zeros_like(m) for m in masks]
        null_states = [torch.zeros_like(s) for s in states]
        single = len(states) == 1

        def denoise(x, t, conditional: bool):
            s, m = (states, masks) if conditional else (null_states, null_masks)
            if single:
                s, m = s[0], m[0]
            return model(x, t.to(dev), s, m).sample.float()

        c = self.autoencoder.latent_channels
        if generator is None and isinstance(seed, (list, tuple)):
            if len(seed) != b:
                raise ValueError(f"got {len(seed)} seeds for {b} prompts; pass one seed or one per prompt")
            noise = torch.cat(
                [torch.randn(1, c, lh, lw, generator=torch.Generator().manual_seed(int(s))) for s in seed]
            ).to(dev)
        else:
            if generator is None:
                generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
            noise = torch.randn(b, c, lh, lw, generator=generator).to(dev)
        latents = flow.euler_sample(denoise, noise, num_steps, shift=shift, guidance_scale=guidance_scale, progress=progress)
        images = self.autoencoder.decode(latents).float().clamp(-1, 1)
        if was_training:
            model.train()
        return images if output_type == "pt" else tensor_to_pil(images)

    # ------------------------------------------------------------------------------------------------
    # Saving and loading
    # ------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory):
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(str(d / "transformer"))
        ae_spec = self.autoencoder_spec
        if ae_spec is None:
            if getattr(self.autoencoder, "name", None) == "pixel" or type(self.autoencoder).__name__ == "PixelSpace":
                ae_spec = "pixel"
            elif hasattr(self.autoencoder, "save_pretrained"):
                self.autoencoder.save_pretrained(str(d / "autoencoder"))
                ae_spec = "./autoencoder"
            else:
                raise ValueError(
                    f"cannot record how to rebuild autoencoder {getattr(self.autoencoder, 'name', '')!r}; "
                    "pass autoencoder_spec= (a local directory) to PocketDiTPipeline"
                )
        text_specs = self.text_specs or _text_specs(self.text_conditioner)
        max_lengths = self.max_lengths or list(getattr(self.text_conditioner, "max_lengths", [])) or None
        meta = {
            "_class_name": type(self).__name__,
            "text_encoders": text_specs,
            "text_max_lengths": max_lengths,
            "autoencoder": ae_spec,
            "default_size": self.default_size,
            "default_steps": self.default_steps,
            "default_guidance": self.default_guidance,
            "default_shift": self.default_shift,
        }
        (d / PIPELINE_FILE).write_text(json.dumps(meta, indent=2))
        return d

    @classmethod
    def from_pretrained(cls, directory, device=None, ema: bool = True):
        """Load a saved pipeline, a training run directory (its latest checkpoint) or a checkpoint directory."""
        d = Path(directory)
        if not d.exists():
            raise FileNotFoundError(
                f"pipeline not found: {d} (pass a directory written by PocketDiTPipeline.save_pretrained, a training "
                "run directory or a checkpoint-* directory)"
            )
        if (d / PIPELINE_FILE).is_file():
            return cls._from_pipeline_dir(d, device)
        return cls.from_checkpoint(d, device=device, ema=ema)

    @classmethod
    def _from_pipeline_dir(cls, d: Path, device=None):
        from .autoencoder import load_autoencoder
        from .model import PocketDiT
        from .quantize import QUANT_CONFIG_NAME, load_quantized
        from .text import build_text_conditioner

        try:
            meta = json.loads((d / PIPELINE_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{d / PIPELINE_FILE} is not valid JSON: {e}") from e
        for key in ("text_encoders", "autoencoder"):
            if key not in meta:
                raise ValueError(f"{d / PIPELINE_FILE} has no {key!r} entry")
        if not (d / "transformer" / "config.json").is_file():
            raise FileNotFoundError(f"{d / 'transformer'} is missing (expected config.json + safetensors weights)")
        if (d / "transformer" / QUANT_CONFIG_NAME).is_file():  # written by `pocketdit quantize`
            transformer = load_quantized(d / "transformer")
        else:
            transformer = PocketDiT.from_pretrained(str(d / "transformer"))
        ae_spec = meta["autoencoder"]
        ae = load_autoencoder(str(d / ae_spec[2:]) if ae_spec.startswith("./") else ae_spec)
        text = build_text_conditioner(meta["text_encoders"], dropout_probs=0.0, max_lengths=meta.get("text_max_lengths"))
        pipe = cls(
            transformer, text, ae, text_specs=meta["text_encoders"], max_lengths=meta.get("text_max_lengths"),
            autoencoder_spec=ae_spec if not ae_spec.startswith("./") else None,
            default_size=meta.get("default_size"), default_steps=meta.get("default_steps", 20),
            default_guidance=meta.get("default_guidance", 3.0), default_shift=meta.get("default_shift", 1.0),
        )
        return pipe.to(device) if device is not None else pipe

    @classmethod
    def from_checkpoint(cls, path, device=None, ema: bool = True):
        """From a training run directory or checkpoint: its config names the text encoders and autoencoder."""
        from .autoencoder import load_autoencoder
        from .text import build_text_conditioner
        from .trainer import CheckpointError, load_checkpoint_weights, resolve_checkpoint

        ckpt = resolve_checkpoint(path)
        state_file = ckpt / "trainer_state.json"
        if not state_file.is_file():
            raise CheckpointError(f"{ckpt} has no trainer_state.json, so its text encoder and autoencoder are unknown")
        cfg = json.loads(state_file.read_text())["config"]
        transformer = load_checkpoint_weights(ckpt, ema=ema)
        text = build_text_conditioner(cfg["text"]["encoders"], dropout_probs=0.0, max_lengths=cfg["text"]["max_length"])
        ae = load_autoencoder(cfg["autoencoder"])
        train = cfg.get("train", {})
        pipe = cls(
            transformer, text, ae, text_specs=cfg["text"]["encoders"], autoencoder_spec=None if hasattr(ae, "save_pretrained") else cfg["autoencoder"],
            default_size=cfg["data"]["resolution"], default_steps=train.get("sample_steps", 20),
            default_guidance=train.get("sample_guidance", 3.0), default_shift=train.get("sample_shift", 1.0),
        )
        return pipe.to(device) if device is not None else pipe
