"""PocketDiTPipeline: prompt -> image, a diffusers `DiffusionPipeline`.

    from pocketdit import PocketDiTPipeline
    pipe = PocketDiTPipeline.from_pretrained("my-pipeline")        # or a training run / checkpoint-* directory
    images = pipe("a red circle", num_inference_steps=20, guidance_scale=3.0, height=32, width=32,
                  generator=torch.Generator().manual_seed(0)).images

Components (registered, saved by `save_pretrained`, listed in model_index.json):
    transformer       PocketDiT (pocketdit.model), or a quantized one (pocketdit.quantize.QuantizedPocketDiT)
    scheduler         FlowMatchEulerDiscreteScheduler(shift=...) - the sampling schedule; its `shift` is the
                      model's noise-schedule shift (the training config's `schedule.shift`), saved with it
    text_conditioner  pocketdit.text.TextConditioner; saved as references ("minilm" or a local encoder's path)
    autoencoder       PixelSpace (config only), TinyAutoencoder (weights), or DiffusersAutoencoder (the VAE)
Sampling defaults (`default_size`, `default_steps`, `default_guidance`) are pipeline config values.

On disk:
    my-pipeline/
      model_index.json          component classes + sampling defaults
      transformer/              config.json + diffusion_pytorch_model.safetensors (or quantization_config.json + ...)
      scheduler/                scheduler_config.json
      text_conditioner/         config.json (encoder specs, max lengths)
      autoencoder/              config.json (+ weights unless pixel space)

`DiffusionPipeline.from_pretrained(dir)` loads it too once `pocketdit.pipeline` is imported (diffusers only
resolves classes from modules that are already imported). Directories of the earlier format (pipeline.json)
are converted on load by `PocketDiTPipeline.from_pretrained`; re-save them to get the layout above.

Sampling: the default schedule is `shift(linspace(1, 0, N + 1))` - exactly `flow.euler_sample`'s - given to
the scheduler as `sigmas=linspace(1, 0, N + 1)[:-1]` (it applies the shift and appends 0). The model takes
t = timestep / num_train_timesteps in [0, 1] (t = 1 is noise). Any diffusers flow-matching scheduler can be
swapped in (`pipe.scheduler = FlowMatchHeunDiscreteScheduler(shift=pipe.shift)`); schedulers whose
`set_timesteps` takes no `sigmas` use their own spacing for `num_inference_steps`.

Classifier-free guidance: the unconditional branch gives the model all-False text masks and zero states,
so it attends only to its learned null token - exactly the input caption dropout produced in training - or,
with `negative_prompt`, the negative prompt's states and masks. The two branches run as two forward calls
(batching them changes results by float rounding, and guided sampling is chaotic enough to flip images).

Per-image noise: pass `generator=[torch.Generator().manual_seed(s) for s in seeds]` (one per image) or,
equivalently, `seed=seeds`; image i's noise then depends only on seeds[i], not on the batch it is in.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import diffusers
import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import is_compiled_module, randn_tensor

# DiffusionPipeline.from_pretrained resolves model_index.json's "pocketdit.<module>" entries from sys.modules:
# import every module a component class can live in.
from . import autoencoder as _autoencoder  # noqa: F401
from . import flow
from . import model as _model  # noqa: F401
from . import quantize as _quantize
from . import text as _text  # noqa: F401
from .checkpoint import CheckpointError, load_checkpoint_weights, resolve_checkpoint
from .text import encode_prompts
from .utils import make_grid  # noqa: F401  (torch-free; re-exported here where it always lived)

__all__ = ["PocketDiTPipeline", "ImagePipelineOutput", "make_scheduler", "make_grid", "tensor_to_pil"]

LEGACY_PIPELINE_FILE = "pipeline.json"
MODEL_INDEX_FILE = "model_index.json"
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
COMPONENTS = ("transformer", "scheduler", "text_conditioner", "autoencoder")

# Keywords of the earlier PocketDiTPipeline.__call__ and what replaced them (named in the TypeError).
_RENAMED_CALL_ARGS = {
    "prompts": "prompt",
    "num_steps": "num_inference_steps",
    "shift": "the scheduler's config (pipe.scheduler = make_scheduler(shift); pipe.shift reads it)",
    "progress": "pipe.set_progress_bar_config(disable=True)",
}


def tensor_to_pil(images: torch.Tensor):
    """(B, 3, H, W) in [-1, 1] -> list of PIL RGB images."""
    from PIL import Image

    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in x]


def make_scheduler(shift: float = 1.0) -> FlowMatchEulerDiscreteScheduler:
    """The pipeline's scheduler for a model trained with noise-schedule shift `shift` (config `schedule.shift`)."""
    if not float(shift) > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    return FlowMatchEulerDiscreteScheduler(shift=float(shift))


def _checkpoint_shift(cfg: dict) -> float:
    """The shift a checkpoint's config trained and sampled with: schedule.shift; older configs sampled with
    train.sample_shift (default 1.0) and had no schedule section."""
    schedule = cfg.get("schedule")
    if isinstance(schedule, dict) and schedule.get("shift") is not None:
        return float(schedule["shift"])
    return float((cfg.get("train") or {}).get("sample_shift", 1.0))


class PocketDiTPipeline(DiffusionPipeline):
    """Text-to-image sampling with a PocketDiT.

    Args:
        transformer: the PocketDiT.
        scheduler: a diffusers flow-matching scheduler, normally `make_scheduler(shift)` with the training shift.
        text_conditioner: `encode(prompts) -> (states list, masks list)`, with `.embed_dims` (a TextConditioner
            to be savable).
        autoencoder: `decode(latents) -> images in [-1, 1]`, with `latent_channels` and `downsample_factor`.
        default_size, default_steps, default_guidance: sampling defaults stored with the pipeline
            (default_size None = 256).
    """

    model_cpu_offload_seq = "text_conditioner->transformer->autoencoder"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        transformer,
        scheduler,
        text_conditioner,
        autoencoder,
        default_size: Optional[int] = None,
        default_steps: int = 20,
        default_guidance: float = 3.0,
    ):
        super().__init__()
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
        if not hasattr(scheduler, "set_timesteps") or not hasattr(scheduler, "step"):
            raise TypeError(f"scheduler must be a diffusers scheduler (set_timesteps, step), got {type(scheduler).__name__}")
        self.register_modules(
            transformer=transformer, scheduler=scheduler, text_conditioner=text_conditioner, autoencoder=autoencoder
        )
        self.register_to_config(
            default_size=None if default_size is None else int(default_size),
            default_steps=int(default_steps),
            default_guidance=float(default_guidance),
        )

    # ------------------------------------------------------------------------------------------------
    # Defaults and devices
    # ------------------------------------------------------------------------------------------------
    @property
    def default_size(self) -> Optional[int]:
        return self.config.default_size

    @default_size.setter
    def default_size(self, value):
        self.register_to_config(default_size=None if value is None else int(value))

    @property
    def default_steps(self) -> int:
        return self.config.default_steps

    @default_steps.setter
    def default_steps(self, value):
        self.register_to_config(default_steps=int(value))

    @property
    def default_guidance(self) -> float:
        return self.config.default_guidance

    @default_guidance.setter
    def default_guidance(self, value):
        self.register_to_config(default_guidance=float(value))

    @property
    def shift(self) -> float:
        """The noise-schedule shift: the scheduler's config `shift` (1.0 when it has none)."""
        return float(self.scheduler.config.get("shift", 1.0))

    @property
    def default_shift(self) -> float:
        """The earlier name of `shift` (read-only: set the shift through the scheduler)."""
        return self.shift

    @property
    def device(self) -> torch.device:
        """The transformer's device (the autoencoder may have no parameters at all)."""
        try:
            return next(self.transformer.parameters()).device
        except (StopIteration, AttributeError):
            return super().device

    @property
    def dtype(self) -> torch.dtype:
        try:
            return next(self.transformer.parameters()).dtype
        except (StopIteration, AttributeError):
            return torch.float32

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # ------------------------------------------------------------------------------------------------
    # Sizes and prompts
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

    def _encode(self, prompts: list[str], device=None):
        states, masks = encode_prompts(self.text_conditioner, prompts)
        dev = self._execution_device if device is None else device
        return [s.to(dev) for s in states], [m.to(dev).bool() for m in masks]

    def encode_prompt(
        self,
        prompt: Union[str, Sequence[str]],
        negative_prompt: Union[str, Sequence[str], None] = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        device=None,
    ):
        """-> (states, masks, negative_states, negative_masks), each a list with one tensor per text encoder and
        num_images_per_prompt rows per prompt (image order: prompt 0's images, then prompt 1's ...).

        Without a negative prompt the negative branch is the null condition (zero states, all-False masks);
        negative_states/masks are None when do_classifier_free_guidance is False."""
        prompts = _prompt_list(prompt)
        states, masks = self._encode(prompts, device)
        neg_states = neg_masks = None
        if do_classifier_free_guidance:
            if negative_prompt is None:
                neg_states = [torch.zeros_like(s) for s in states]
                neg_masks = [torch.zeros_like(m) for m in masks]
            else:
                negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
                if len(negatives) != len(prompts):
                    raise ValueError(
                        f"got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one string or one per prompt"
                    )
                neg_states, neg_masks = self._encode(negatives, device)
        n = int(num_images_per_prompt)

        def repeat(xs):
            return None if xs is None else [x.repeat_interleave(n, dim=0) for x in xs]

        return repeat(states), repeat(masks), repeat(neg_states), repeat(neg_masks)

    # ------------------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------------------
    @staticmethod
    def _set_timesteps(scheduler, num_inference_steps: int, sigmas, device) -> torch.Tensor:
        params = inspect.signature(scheduler.set_timesteps).parameters
        accepts_sigmas = "sigmas" in params
        if sigmas is None and accepts_sigmas:
            # flow.euler_sample's schedule: the scheduler shifts these once and appends the final 0
            sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
        if sigmas is not None:
            if not accepts_sigmas:
                raise ValueError(f"{type(scheduler).__name__}.set_timesteps does not take custom sigmas")
            scheduler.set_timesteps(sigmas=list(map(float, sigmas)), device=device)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler.timesteps

    def _denoise(self, latents, t, states, masks):
        if len(states) == 1:
            states, masks = states[0], masks[0]
        return self.transformer(latents, t, states, masks).sample.float()

    @torch.no_grad()
    def __call__(
        self,
        prompt: Union[str, Sequence[str]] = None,
        negative_prompt: Union[str, Sequence[str], None] = None,
        num_inference_steps: Optional[int] = None,
        guidance_scale: Optional[float] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_images_per_prompt: int = 1,
        generator: Union[torch.Generator, Sequence[torch.Generator], None] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        sigmas: Optional[Sequence[float]] = None,
        seed: Union[int, Sequence[int], None] = None,
        **kwargs,
    ):
        """Generate `num_images_per_prompt` images per prompt.

        Args:
            prompt: a string or a list of strings.
            negative_prompt: replaces the null condition of the unconditional branch (one string or one per prompt).
            num_inference_steps, guidance_scale, height, width: default to the pipeline's defaults. Guidance runs
                whenever guidance_scale != 1.
            generator: a torch.Generator, or one per image (image i's noise then comes from generator[i] alone).
                Without generator, seed and latents the noise comes from torch's global RNG.
            seed: PocketDiT shorthand for generator: an int (one CPU generator for the batch) or one int per image
                (the same as generator=[torch.Generator().manual_seed(s) for s in seed]).
            latents: the starting noise, (num images, latent channels, height / f, width / f).
            output_type: "pil" (list of PIL images), "np" ((B, H, W, 3) float32 in [0, 1]), "pt" ((B, 3, H, W)
                float32 in [0, 1], as in diffusers) or "latent" (the final latents, not decoded).
            callback_on_step_end: `fn(pipe, i, t, callback_kwargs) -> dict` after each step, with
                callback_kwargs holding `callback_on_step_end_tensor_inputs` ("latents"); returned "latents"
                replace the current ones. Setting `pipe._interrupt = True` skips the remaining steps.
            sigmas: custom (unshifted) noise levels, decreasing from 1, for schedulers that take them; the
                scheduler applies its shift and appends 0. Default linspace(1, 0, steps + 1)[:-1].
        Returns ImagePipelineOutput(images=...), or (images,) when return_dict is False.
        """
        if kwargs:
            hints = [f"{k!r} -> {_RENAMED_CALL_ARGS[k]}" for k in kwargs if k in _RENAMED_CALL_ARGS]
            raise TypeError(
                f"PocketDiTPipeline() got unexpected keyword arguments {sorted(kwargs)}"
                + (f" (the diffusers call: {'; '.join(hints)})" if hints else "")
            )
        images = self._generate(
            prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
            num_images_per_prompt, generator, latents, output_type, callback_on_step_end,
            callback_on_step_end_tensor_inputs, sigmas, seed,
        )
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _generate(self, prompt, negative_prompt, num_inference_steps, guidance_scale, height, width,
                  num_images_per_prompt, generator, latents, output_type, callback_on_step_end,
                  callback_on_step_end_tensor_inputs, sigmas, seed):
        scheduler = self.scheduler
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        prompts = _prompt_list(prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} not in {self._callback_tensor_inputs}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        num_inference_steps = self.default_steps if num_inference_steps is None else int(num_inference_steps)
        if num_inference_steps < 1 and sigmas is None:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        guidance_scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        size = self.default_size or 256
        height, width = height or size, width or size
        lh, lw = self.check_image_size(height, width)
        batch = len(prompts) * num_images_per_prompt
        generator = _generators(generator, seed, batch)
        c = self.autoencoder.latent_channels
        device = self._execution_device
        if latents is None:
            latents = randn_tensor((batch, c, lh, lw), generator=generator, device=device, dtype=torch.float32)
        else:
            if not torch.is_tensor(latents) or tuple(latents.shape) != (batch, c, lh, lw):
                got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
                raise ValueError(
                    f"latents must have shape {(batch, c, lh, lw)} ({batch} images x {c} latent channels x "
                    f"{height}x{width} / {self.autoencoder.downsample_factor}), got {got}"
                )
            latents = latents.to(device=device, dtype=torch.float32)

        self._guidance_scale = guidance_scale
        self._interrupt = False
        model = self.transformer
        was_training = model.training
        model.eval()
        try:
            states, masks, neg_states, neg_masks = self.encode_prompt(
                prompts, negative_prompt, num_images_per_prompt, guidance_scale != 1.0, device
            )
            timesteps = self._set_timesteps(scheduler, num_inference_steps, sigmas, device)
            self._num_timesteps = len(timesteps)
            order = getattr(scheduler, "order", 1)
            num_warmup_steps = max(len(timesteps) - scheduler.num_inference_steps * order, 0)
            step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
            scale_t = float(scheduler.config.num_train_timesteps)
            with self.progress_bar(total=scheduler.num_inference_steps) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    t_model = (t / scale_t).to(device=device, dtype=torch.float32).expand(batch)
                    v = self._denoise(latents, t_model, states, masks)
                    if self._guidance_scale != 1.0:
                        if neg_states is None:  # a callback switched guidance on
                            neg_states = [torch.zeros_like(s) for s in states]
                            neg_masks = [torch.zeros_like(m) for m in masks]
                        v_uncond = self._denoise(latents, t_model, neg_states, neg_masks)
                        v = flow.classifier_free_guidance(v, v_uncond, self._guidance_scale)
                    latents = scheduler.step(v, t, latents, **step_kwargs, return_dict=False)[0]
                    if callback_on_step_end is not None:
                        callback_kwargs = {}
                        for k in callback_on_step_end_tensor_inputs:
                            callback_kwargs[k] = locals()[k]
                        outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                        latents = outputs.pop("latents", latents)
                    if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % order == 0):
                        progress_bar.update()
            if output_type == "latent":
                images = latents
            else:
                decoded = self.autoencoder.decode(latents).float().clamp(-1, 1)
                if output_type == "pil":
                    images = tensor_to_pil(decoded)
                elif output_type == "pt":
                    images = (decoded + 1) / 2
                else:
                    images = ((decoded + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
        finally:
            if was_training:
                model.train()
        self.maybe_free_model_hooks()
        return images

    # ------------------------------------------------------------------------------------------------
    # Saving
    # ------------------------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory,
        safe_serialization: bool = True,
        variant: Optional[str] = None,
        max_shard_size=None,
        push_to_hub: bool = False,
        **kwargs,
    ):
        """Write model_index.json and one folder per component (see the module docstring).

        Unlike DiffusionPipeline's, a component that cannot be saved is an error (not a warning and a null
        entry), and a quantized transformer is written with `quantize.save_quantized`."""
        if push_to_hub:
            raise NotImplementedError("push_to_hub: save to a directory, then upload it with huggingface_hub.upload_folder")
        d = Path(save_directory)
        d.mkdir(parents=True, exist_ok=True)
        entries = {}
        for name in COMPONENTS:
            component = getattr(self, name)
            if is_compiled_module(component):
                component = component._orig_mod
            folder = d / name
            if name == "transformer" and getattr(component, "_pocketdit_quantization", None) is not None:
                if folder.exists():
                    shutil.rmtree(folder)
                _quantize.save_quantized(component, folder)
                entries[name] = ["pocketdit.quantize", "QuantizedPocketDiT"]
                continue
            save = getattr(component, "save_pretrained", None)
            if save is None:
                raise ValueError(
                    f"cannot save the pipeline's {name}: {type(component).__name__} has no save_pretrained "
                    "(build the pipeline from a pocketdit TextConditioner / autoencoder to save it)"
                )
            params = inspect.signature(save).parameters
            save_kwargs = {}
            if "safe_serialization" in params:
                save_kwargs["safe_serialization"] = safe_serialization
            if "variant" in params and variant is not None:
                save_kwargs["variant"] = variant
            if "max_shard_size" in params and max_shard_size is not None:
                save_kwargs["max_shard_size"] = max_shard_size
            save(str(folder), **save_kwargs)
        self.save_config(str(d))
        if entries:
            index = json.loads((d / MODEL_INDEX_FILE).read_text())
            index.update(entries)
            (d / MODEL_INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (d / LEGACY_PIPELINE_FILE).unlink(missing_ok=True)  # re-saving an old directory in place
        return d

    # ------------------------------------------------------------------------------------------------
    # Loading
    # ------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, device=None, ema: bool = True, **kwargs):
        """A saved pipeline (model_index.json), an earlier-format one (pipeline.json, converted), a training run
        directory (its latest checkpoint) or a checkpoint-* directory. Local paths only.

        `device` moves the pipeline there; `ema` picks the EMA weights of a checkpoint. Other kwargs go to
        DiffusionPipeline.from_pretrained (e.g. scheduler=... to replace the saved scheduler)."""
        d = Path(pretrained_model_name_or_path)
        if not d.exists():
            raise FileNotFoundError(
                f"pipeline not found: {d} (pass a directory written by PocketDiTPipeline.save_pretrained, a training "
                "run directory or a checkpoint-* directory)"
            )
        if (d / MODEL_INDEX_FILE).is_file():
            pipe = cls._from_model_index(d, **kwargs)
        elif (d / LEGACY_PIPELINE_FILE).is_file():
            pipe = cls._from_legacy_dir(d, **kwargs)
        else:
            pipe = cls.from_checkpoint(d, ema=ema, **kwargs)
        return pipe.to(device) if device is not None else pipe

    @classmethod
    def _from_model_index(cls, d: Path, **kwargs):
        try:
            index = json.loads((d / MODEL_INDEX_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{d / MODEL_INDEX_FILE} is not valid JSON: {e}") from e
        missing = [name for name in COMPONENTS if name not in index and name not in kwargs]
        if missing:
            raise ValueError(f"{d / MODEL_INDEX_FILE} has no {', '.join(map(repr, missing))} entr{'y' if len(missing) == 1 else 'ies'}; "
                             "is it a PocketDiT pipeline?")
        for name in COMPONENTS:
            if name in kwargs:
                continue
            entry = index[name]
            if not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
                raise ValueError(f"{d / MODEL_INDEX_FILE}: component {name!r} was not saved ({entry!r})")
            if not (d / name).is_dir():
                raise FileNotFoundError(f"{d / name} is missing ({MODEL_INDEX_FILE} lists {name} as {entry[1]})")
        qconfig = d / "transformer" / _quantize.QUANT_CONFIG_NAME
        if "transformer" not in kwargs and qconfig.is_file() and index["transformer"][1] != "QuantizedPocketDiT":
            kwargs["transformer"] = _quantize.load_quantized(d / "transformer")  # transformer/ replaced by hand
        from .autoencoder import _low_cpu_mem_usage

        kwargs.setdefault("low_cpu_mem_usage", _low_cpu_mem_usage())  # diffusers warns when accelerate is missing
        return super().from_pretrained(str(d), **kwargs)

    @classmethod
    def _from_legacy_dir(cls, d: Path, **kwargs):
        """The earlier format: pipeline.json (text encoder specs, autoencoder spec, defaults incl. default_shift)."""
        from .autoencoder import load_autoencoder
        from .model import PocketDiT
        from .text import build_text_conditioner

        try:
            meta = json.loads((d / LEGACY_PIPELINE_FILE).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{d / LEGACY_PIPELINE_FILE} is not valid JSON: {e}") from e
        for key in ("text_encoders", "autoencoder"):
            if key not in meta:
                raise ValueError(f"{d / LEGACY_PIPELINE_FILE} has no {key!r} entry")
        warnings.warn(
            f"{d} is a PocketDiT pipeline in the earlier format ({LEGACY_PIPELINE_FILE}); it was converted on load. "
            f"Re-save it with pipe.save_pretrained(...) to write the diffusers layout ({MODEL_INDEX_FILE}) that "
            "DiffusionPipeline.from_pretrained also reads",
            FutureWarning,
            stacklevel=3,
        )
        if "transformer" in kwargs:
            transformer = kwargs.pop("transformer")
        else:
            if not (d / "transformer" / "config.json").is_file():
                raise FileNotFoundError(f"{d / 'transformer'} is missing (expected config.json + safetensors weights)")
            if (d / "transformer" / _quantize.QUANT_CONFIG_NAME).is_file():  # written by `pocketdit quantize`
                transformer = _quantize.load_quantized(d / "transformer")
            else:
                transformer = PocketDiT.from_pretrained(str(d / "transformer"))
        ae_spec = meta["autoencoder"]
        autoencoder = _given(kwargs, "autoencoder", lambda: load_autoencoder(
            str(d / ae_spec[2:]) if ae_spec.startswith("./") else ae_spec
        ))
        text = _given(kwargs, "text_conditioner", lambda: build_text_conditioner(
            meta["text_encoders"], dropout_probs=0.0, max_lengths=meta.get("text_max_lengths")
        ))
        scheduler = _given(kwargs, "scheduler", lambda: make_scheduler(meta.get("default_shift", 1.0)))
        return cls._build(transformer, scheduler, text, autoencoder, kwargs, default_size=meta.get("default_size"),
                          default_steps=meta.get("default_steps", 20), default_guidance=meta.get("default_guidance", 3.0))

    @classmethod
    def from_checkpoint(cls, path, device=None, ema: bool = True, **kwargs):
        """From a training run directory or checkpoint: its config names the text encoders and the autoencoder,
        and its `schedule.shift` (older checkpoints: `train.sample_shift`, default 1) sets the scheduler's shift.
        Components passed as kwargs (transformer=, scheduler=, text_conditioner=, autoencoder=) are used instead."""
        from .autoencoder import load_autoencoder
        from .text import build_text_conditioner

        ckpt = resolve_checkpoint(path)
        state_file = ckpt / "trainer_state.json"
        if not state_file.is_file():
            raise CheckpointError(f"{ckpt} has no trainer_state.json, so its text encoder and autoencoder are unknown")
        cfg = json.loads(state_file.read_text())["config"]
        transformer = _given(kwargs, "transformer", lambda: load_checkpoint_weights(ckpt, ema=ema))
        text = _given(kwargs, "text_conditioner", lambda: build_text_conditioner(
            cfg["text"]["encoders"], dropout_probs=0.0, max_lengths=cfg["text"]["max_length"]
        ))
        autoencoder = _given(kwargs, "autoencoder", lambda: load_autoencoder(cfg["autoencoder"]))
        scheduler = _given(kwargs, "scheduler", lambda: make_scheduler(_checkpoint_shift(cfg)))
        train = cfg.get("train", {})
        pipe = cls._build(transformer, scheduler, text, autoencoder, kwargs, default_size=cfg["data"]["resolution"],
                          default_steps=train.get("sample_steps", 20), default_guidance=train.get("sample_guidance", 3.0))
        return pipe.to(device) if device is not None else pipe

    @classmethod
    def _build(cls, transformer, scheduler, text, autoencoder, kwargs: dict, **defaults):
        defaults.update({k: kwargs.pop(k) for k in list(kwargs) if k in ("default_size", "default_steps", "default_guidance")})
        if kwargs:
            raise TypeError(f"unexpected arguments for loading a checkpoint or earlier-format pipeline: {sorted(kwargs)}")
        return cls(transformer, scheduler, text, autoencoder, **defaults)


def _given(kwargs: dict, name: str, build: Callable):
    """The component passed as kwargs[name] (popped), else build()."""
    value = kwargs.pop(name, None)
    return build() if value is None else value


def _prompt_list(prompt) -> list[str]:
    if prompt is None:
        raise ValueError("no prompt given")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("no prompts given (an empty list)")
    bad = sorted({type(p).__name__ for p in prompts if not isinstance(p, str)})
    if bad:
        raise TypeError(f"prompts must be strings, got {bad}")
    return prompts


def _generators(generator, seed, batch: int):
    """generator / seed -> what randn_tensor takes: None, one generator, or one per image."""
    if seed is not None:
        if generator is not None:
            raise ValueError("pass either generator or seed, not both")
        if isinstance(seed, (list, tuple)):
            if len(seed) != batch:
                raise ValueError(f"got {len(seed)} seeds for {batch} images; pass one seed or one per image")
            return [torch.Generator().manual_seed(int(s)) for s in seed]
        return torch.Generator().manual_seed(int(seed))
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(
                f"got a list of {len(generator)} generators for {batch} images (prompts x num_images_per_prompt); "
                "pass one generator or one per image"
            )
        return list(generator)
    return generator


# DiffusionPipeline.from_pretrained(dir) looks the model_index.json class name up in the diffusers namespace.
if not hasattr(diffusers, "PocketDiTPipeline"):
    setattr(diffusers, "PocketDiTPipeline", PocketDiTPipeline)
