"""Diffusers flow-matching transformers as teachers: Qwen-Image, FLUX.1, Stable Diffusion 3 and SANA.

Each adapter converts between PocketDiT's units (base.py: x_t = (1 - t) x0 + t noise in the student's normalised
latent space, t in [0, 1], v = noise - x0 on the (B, C, H, W) latent grid) and the conventions its diffusers
pipeline uses around the transformer. All four predict v = noise - x0 in the pipeline's normalised latents (the
scheduler steps prev = x + (sigma_next - sigma) v, i.e. x0 = x_t - sigma v), so the velocity needs no conversion
beyond (un)packing; the latent normalisation is the one DiffusersAutoencoder applies, which is why the student
must be trained on the teacher's VAE (check_latent_space compares the two).

|                 | qwen-image             | flux                | sd3                 | sana                  |
|-----------------|------------------------|---------------------|---------------------|-----------------------|
| timestep given  | t (x1000 inside)       | t (x1000 inside)    | 1000 t              | 1000 t timestep_scale |
| latents in      | 2x2-packed (N, 4C)     | 2x2-packed (N, 4C)  | (C, H, W)           | (C, H, W)             |
| positions       | img_shapes (1,H/2,W/2) | img_ids (0,row,col) | inside the model    | inside the model      |
| normalisation   | (z - mean) / std       | (z - shift) * scale | (z - shift) * scale | z * scale             |
| text encoders   | Qwen2.5-VL (a)         | CLIP pooled + T5    | CLIP-L + G (+ T5)   | Gemma-2 (b)           |
| max text tokens | 512                    | 512                 | 256 (T5)            | 300                   |
| negative prompt | " "                    | ""                  | ""                  | "" (no instruction)   |
| guidance_rule   | cfg-renorm (c)         | embedded (d) / cfg  | cfg                 | cfg                   |

Normalisation is the one DiffusersAutoencoder applies and each pipeline inverts before decoding: Qwen-Image's
per-channel latents_mean/latents_std, FLUX.1 and SD3's shift_factor/scaling_factor, SANA's (DC-AE) scaling_factor.
(a) The pipeline's prompt template, its first 34 tokens dropped, padding masked. (b) With the pipeline's default
complex human instruction; the negative prompt is encoded without it, as the pipeline does. (c) Qwen-Image's true
CFG: comb = uncond + s (cond - uncond), rescaled to comb * ||cond|| / ||comb|| per packed token. (d) FLUX.1
checkpoints with `guidance_embeds` (FLUX.1-dev) are guidance-distilled: the scale goes to the guidance embedding
in a single pass (the pipeline's default is 3.5); without it (FLUX.1-schnell) guidance is plain CFG.

Packing (Qwen-Image, FLUX.1): (B, C, H, W) -> (B, H/2 * W/2, 4C), tokens row-major over the (H/2, W/2) grid and
channels ordered (c, i, j) within a 2x2 patch, as the pipelines' _pack_latents/_unpack_latents. SD3 and SANA take
the (B, C, H, W) latents and patchify inside (patch_size from their config; H, W must be multiples of it).

A prompt of None is the teacher's unconditional input: its negative prompt. Guidance is applied when
guidance_scale != 1 (FLUX.1-dev always feeds the scale to its guidance embedding, 1.0 included).

Features are the final transformer block's image tokens, before norm_out/proj_out (for FLUX.1 the last single-stream
block with the text tokens dropped), from the conditional pass; feature_grid is the token grid (H/p, W/p),
p = 2 for the packed models and the transformer's patch size otherwise, row-major like PocketDiT's tokens.

Text embeddings are cached per prompt (LRU, `cache_size` prompts and at most `cache_max_bytes` bytes, on the CPU),
since the text encoders (a 7B Qwen2.5-VL, T5-XXL) cost more per prompt than a transformer call.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Teacher, TeacherOutput, register_teacher

__all__ = [
    "QwenImageTeacher",
    "FluxTeacher",
    "SD3Teacher",
    "SanaTeacher",
    "pack_latents",
    "unpack_latents",
]


def _diffusers_class(name: str, kind: str):
    """A diffusers class by name; a clear error when the installed diffusers predates it (only when that teacher
    is used: importing this module needs no optional class)."""
    import diffusers

    try:
        return getattr(diffusers, name)
    except (AttributeError, ImportError) as e:  # diffusers' lazy module raises either for an unknown name
        raise ImportError(
            f"the {kind!r} teacher needs diffusers.{name}, which the installed diffusers {diffusers.__version__} does "
            "not provide; upgrade diffusers (pip install -U diffusers)"
        ) from e


def _dtype_kwarg() -> str:
    """The loading keyword for the dtype: newer diffusers take `dtype` and deprecate `torch_dtype`, which older
    ones require."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _call_default(pipeline_cls, name: str):
    """A default of the pipeline's __call__ (what a plain `pipe(prompt)` uses), read from the installed source."""
    return inspect.signature(pipeline_cls.__call__).parameters[name].default


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches, row-major, channels (c, i, j) (Flux/QwenImage _pack_latents)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of pack_latents for a (height, width) latent grid (the pipelines' _unpack_latents)."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def _stack_rows(rows, device) -> tuple:
    """Per-prompt rows (tuples of tensors) -> batched tensors; sequences (dim 0) are zero-padded to the longest,
    which also pads a row's attention mask with zeros."""
    out = []
    for field in zip(*rows):
        n = max(f.shape[0] for f in field)
        padded = [F.pad(f, (0, 0) * (f.ndim - 1) + (0, n - f.shape[0])) if f.shape[0] < n else f for f in field]
        out.append(torch.stack([f.to(device) for f in padded]))  # cached rows live on the CPU, fresh ones not
    return tuple(out)


class _DiffusersTeacher(Teacher):
    """Shared machinery: text encoding through the pipeline's own encode_prompt, the prompt cache, guidance and the
    feature hook. Subclasses name their classes and implement `_encode_rows`, `_transformer_velocity`."""

    kind: str
    transformer_class: str
    pipeline_class: str
    #: the pipeline constructor's text components, in the order the adapter's constructor takes them
    text_components: tuple = ("text_encoder", "tokenizer")
    #: the prompt of the unconditional branch (and of a None prompt)
    negative_prompt: str = ""
    #: 2 for the 2x2-packed models, else the transformer's patch size
    patch_multiple: int = 1
    cache_size: int = 20000
    cache_max_bytes: int = 4 << 30

    def __init__(self, transformer, text: dict, vae=None, device=None, dtype=None,
                 max_sequence_length: Optional[int] = None):
        super().__init__(device, dtype)
        if type(transformer).__name__ != self.transformer_class:
            raise TypeError(f"{type(self).__name__} wraps a {self.transformer_class}, got {type(transformer).__name__}")
        pipeline_cls = _diffusers_class(self.pipeline_class, self.kind)
        self.transformer = transformer.eval().requires_grad_(False)  # first: Teacher.dtype reads the first parameter
        for name in self.text_components:
            component = text.get(name)
            if isinstance(component, nn.Module):
                component.eval().requires_grad_(False)
            setattr(self, name, component)
        # The pipeline object only runs encode_prompt: it shares the modules (no copies) and holds no VAE/scheduler.
        self._pipe = pipeline_cls(transformer=transformer, scheduler=None, vae=None,
                                  **{n: text.get(n) for n in self.text_components})
        self.max_sequence_length = int(max_sequence_length or _call_default(pipeline_cls, "max_sequence_length"))
        self.hold_autoencoder(_as_autoencoder(vae))
        cfg = transformer.config
        self.feature_dim = cfg.num_attention_heads * cfg.attention_head_dim
        self._cache: "OrderedDict[str, tuple]" = OrderedDict()
        self._cache_bytes = 0
        self._negative_row = None
        for module in self.children():
            p = next(module.parameters(), None)
            if p is None:
                continue
            if device is not None:
                module.to(device)
            # from_pretrained loads in `dtype` already; casting again would also cast what the model keeps in fp32
            # on purpose (T5's wo layers, rotary frequencies)
            if dtype is not None and p.dtype != dtype:
                module.to(dtype)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype: Optional[torch.dtype] = None, **kwargs):
        """A local diffusers pipeline directory (model_index.json, transformer/, text encoders, tokenizers, vae/,
        scheduler/). The VAE is loaded in fp32 and only held, for check_latent_space; the transformer and text
        encoders load in `dtype` (fp32 when None)."""
        from ..autoencoder import DiffusersAutoencoder, _low_cpu_mem_usage

        pipeline_cls = _diffusers_class(cls.pipeline_class, cls.kind)
        autoencoder = DiffusersAutoencoder.from_pretrained(path)
        pipe = pipeline_cls.from_pretrained(str(path), vae=autoencoder.vae, low_cpu_mem_usage=_low_cpu_mem_usage(),
                                            **{_dtype_kwarg(): dtype or torch.float32})
        text = {name: getattr(pipe, name, None) for name in cls.text_components}
        return cls(pipe.transformer, **text, vae=autoencoder, device=device, dtype=dtype, **kwargs)

    # -- text ----------------------------------------------------------------------------------------------
    def _encode_rows(self, prompts: list) -> list:
        """One tuple of per-prompt tensors (no batch dim) per prompt, as the pipeline encodes them."""
        raise NotImplementedError

    def _encode_negative_row(self) -> tuple:
        return self._encode_rows([self.negative_prompt])[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[Optional[str]]) -> dict:
        """{"prompt": batched text inputs, "negative": the negative prompt's, repeated}. A None prompt is the
        negative prompt (the teacher's unconditional input)."""
        prompts = list(prompts)
        for p in prompts:
            if p is not None and not isinstance(p, str):
                raise TypeError(f"prompts must be strings or None, got {type(p).__name__}")
        if self._negative_row is None:
            self._negative_row = tuple(x.cpu() for x in self._encode_negative_row())
        misses = list(dict.fromkeys(p for p in prompts if p is not None and p not in self._cache))
        fresh = dict(zip(misses, self._encode_rows(misses))) if misses else {}
        rows = []
        for p in prompts:
            if p is None:
                rows.append(self._negative_row)
            elif p in fresh:
                rows.append(fresh[p])
            else:
                self._cache.move_to_end(p)
                rows.append(self._cache[p])
        for p, row in fresh.items():
            self._cache_put(p, row)
        negative = _stack_rows([self._negative_row] * len(rows), self.device)
        return {"prompt": _stack_rows(rows, self.device), "negative": negative}

    def _cache_put(self, key: str, row: tuple) -> None:
        nbytes = sum(x.numel() * x.element_size() for x in row)
        if self.cache_size <= 0 or nbytes > self.cache_max_bytes:
            return
        self._cache[key] = tuple(x.cpu() for x in row)
        self._cache_bytes += nbytes
        while len(self._cache) > self.cache_size or self._cache_bytes > self.cache_max_bytes:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= sum(x.numel() * x.element_size() for x in old)

    # -- transformer -------------------------------------------------------------------------------------
    @property
    def _true_cfg(self) -> bool:
        """Whether guidance runs a second, unconditional pass (False for guidance-distilled models)."""
        return True

    def _to_model_layout(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _from_model_layout(self, v: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return v

    def _feature_block(self) -> nn.Module:
        return self.transformer.transformer_blocks[-1]

    def _transformer_velocity(self, x, t, text: tuple, hw: tuple, guidance_scale: float) -> torch.Tensor:
        """The transformer's output for model-layout latents x, t in [0, 1] of shape (B,)."""
        raise NotImplementedError

    def _guide(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
        return v_uncond + scale * (v_cond - v_uncond)

    def _run(self, x, t, text, hw, guidance_scale, output_features):
        captured = {}
        hook = None
        if output_features:
            hook = self._feature_block().register_forward_hook(lambda m, args, out: captured.__setitem__("out", out))
        try:
            v = self._transformer_velocity(x, t, text, hw, guidance_scale)
        finally:
            if hook is not None:
                hook.remove()
        feats = None
        if output_features:
            out = captured["out"]
            out = out[-1] if isinstance(out, (tuple, list)) else out  # (text, image) blocks return the image last
            gh, gw = hw[0] // self.patch_multiple, hw[1] // self.patch_multiple
            feats = out[:, -gh * gw:]  # a block that returns text + image tokens concatenated: keep the image ones
        return v, feats

    def predict(self, x_t, t, cond, guidance_scale=1.0, output_features=False) -> TeacherOutput:
        h, w = x_t.shape[-2:]
        x = self._to_model_layout(x_t)
        v, feats = self._run(x, t, cond["prompt"], (h, w), guidance_scale, output_features)
        if guidance_scale != 1.0 and self._true_cfg:
            v_uncond, _ = self._run(x, t, cond["negative"], (h, w), guidance_scale, False)
            v = self._guide(v.float(), v_uncond.float(), guidance_scale)
        v = self._from_model_layout(v, h, w)
        grid = (h // self.patch_multiple, w // self.patch_multiple)
        return TeacherOutput(v.float(), None if feats is None else feats.float(), grid)


def _as_autoencoder(vae):
    """A diffusers VAE module wrapped as the student-side DiffusersAutoencoder (its normalised latents are the
    latent space the teacher denoises); a PocketDiT autoencoder or None as is."""
    from ..autoencoder import SUPPORTED_DIFFUSERS_AUTOENCODERS, DiffusersAutoencoder

    if vae is not None and type(vae).__name__ in SUPPORTED_DIFFUSERS_AUTOENCODERS:
        return DiffusersAutoencoder(vae)
    return vae


# ----------------------------------------------------------------------------------------------------
# Qwen-Image
# ----------------------------------------------------------------------------------------------------
@register_teacher("qwen-image")
class QwenImageTeacher(_DiffusersTeacher):
    """Qwen-Image (QwenImagePipeline). Guidance is the pipeline's true CFG with norm rescale, on the packed
    tokens: comb = uncond + s (cond - uncond); comb * ||cond|| / ||comb||, norms over each token's 4C channels."""

    kind = "qwen-image"
    transformer_class = "QwenImageTransformer2DModel"
    pipeline_class = "QwenImagePipeline"
    text_components = ("text_encoder", "tokenizer")
    negative_prompt = " "  # the model card's negative prompt; any negative prompt enables the pipeline's true CFG
    guidance_rule = "cfg-renorm"
    patch_multiple = 2

    def __init__(self, transformer, text_encoder, tokenizer, vae=None, device=None, dtype=None,
                 max_sequence_length: Optional[int] = None):
        cfg = transformer.config
        if getattr(cfg, "use_additional_t_cond", False):
            raise ValueError("this QwenImageTransformer2DModel needs additional_t_cond (Qwen-Image-Layered), which "
                             "text-to-image distillation has no input for")
        super().__init__(transformer, {"text_encoder": text_encoder, "tokenizer": tokenizer}, vae, device, dtype,
                         max_sequence_length)
        self.latent_channels = cfg.in_channels // 4
        # older diffusers releases took the text lengths as an argument instead of reading them from the mask
        self._takes_txt_seq_lens = "txt_seq_lens" in inspect.signature(transformer.forward).parameters

    def _encode_rows(self, prompts):
        embeds, mask = self._pipe.encode_prompt(prompt=prompts, device=self.device,
                                                max_sequence_length=self.max_sequence_length)
        lengths = [embeds.shape[1]] * len(prompts) if mask is None else mask.sum(1).tolist()
        # unpadded rows: padding is rebuilt (zeros, mask 0) for whatever batch a prompt lands in, as the pipeline does
        return [(embeds[i, :n], torch.ones(n, dtype=torch.long)) for i, n in enumerate(lengths)]

    def _to_model_layout(self, x):
        return pack_latents(x)

    def _from_model_layout(self, v, height, width):
        return unpack_latents(v, height, width)

    def _transformer_velocity(self, x, t, text, hw, guidance_scale):
        embeds, mask = text
        dtype = x.dtype
        b = x.shape[0]
        kwargs = {}
        if self._takes_txt_seq_lens:
            kwargs["txt_seq_lens"] = mask.sum(1).tolist()
        return self.transformer(
            hidden_states=x,
            timestep=t.to(dtype),  # QwenTimestepProjEmbeddings scales by 1000 (Timesteps(scale=1000))
            encoder_hidden_states=embeds.to(dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,  # encode_prompt drops an all-ones mask
            img_shapes=[[(1, hw[0] // 2, hw[1] // 2)]] * b,
            return_dict=False,
            **kwargs,
        )[0]

    def _guide(self, v_cond, v_uncond, scale):
        comb = v_uncond + scale * (v_cond - v_uncond)
        return comb * (torch.norm(v_cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))


# ----------------------------------------------------------------------------------------------------
# FLUX.1
# ----------------------------------------------------------------------------------------------------
@register_teacher("flux")
class FluxTeacher(_DiffusersTeacher):
    """FLUX.1 (FluxPipeline). With `guidance_embeds` (FLUX.1-dev) the guidance scale is the guidance embedding's
    input and there is no unconditional pass (guidance_rule "embedded"); without it, plain CFG with negative ""."""

    kind = "flux"
    transformer_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    negative_prompt = ""
    patch_multiple = 2

    def __init__(self, transformer, text_encoder, tokenizer, text_encoder_2, tokenizer_2, vae=None, device=None,
                 dtype=None, max_sequence_length: Optional[int] = None):
        cfg = transformer.config
        out_channels = cfg.out_channels or cfg.in_channels
        if cfg.in_channels != out_channels:
            raise ValueError(f"this FluxTransformer2DModel takes {cfg.in_channels} input channels for "
                             f"{out_channels} output ones (a Fill/Depth/Canny variant with image conditioning); a "
                             "text-to-image teacher needs in_channels == out_channels")
        super().__init__(transformer, {"text_encoder": text_encoder, "tokenizer": tokenizer,
                                       "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2},
                         vae, device, dtype, max_sequence_length)
        self.latent_channels = cfg.in_channels // 4
        self.guidance_embeds = bool(cfg.guidance_embeds)
        self.guidance_rule = "embedded" if self.guidance_embeds else "cfg"

    @property
    def _true_cfg(self):
        return not self.guidance_embeds

    def _encode_rows(self, prompts):
        embeds, pooled, _ = self._pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                     max_sequence_length=self.max_sequence_length)
        return [(embeds[i], pooled[i]) for i in range(len(prompts))]

    def _to_model_layout(self, x):
        return pack_latents(x)

    def _from_model_layout(self, v, height, width):
        return unpack_latents(v, height, width)

    def _feature_block(self):
        blocks = self.transformer.single_transformer_blocks
        return blocks[-1] if len(blocks) else self.transformer.transformer_blocks[-1]

    def _transformer_velocity(self, x, t, text, hw, guidance_scale):
        embeds, pooled = text
        dtype, device = x.dtype, x.device
        gh, gw = hw[0] // 2, hw[1] // 2
        img_ids = torch.zeros(gh, gw, 3, device=device)  # FluxPipeline._prepare_latent_image_ids: (0, row, col)
        img_ids[..., 1] += torch.arange(gh, device=device)[:, None]
        img_ids[..., 2] += torch.arange(gw, device=device)[None, :]
        guidance = None
        if self.guidance_embeds:  # float32 like the pipeline; the transformer scales it by 1000
            guidance = torch.full((x.shape[0],), guidance_scale, device=device, dtype=torch.float32)
        return self.transformer(
            hidden_states=x,
            timestep=t.to(dtype),  # the transformer multiplies by 1000
            guidance=guidance,
            pooled_projections=pooled.to(dtype),
            encoder_hidden_states=embeds.to(dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=img_ids.reshape(gh * gw, 3).to(dtype),
            return_dict=False,
        )[0]


# ----------------------------------------------------------------------------------------------------
# Stable Diffusion 3 / 3.5
# ----------------------------------------------------------------------------------------------------
@register_teacher("sd3")
class SD3Teacher(_DiffusersTeacher):
    """Stable Diffusion 3/3.5 (StableDiffusion3Pipeline): timestep 1000 t, unpacked latents, CLIP-L + CLIP-G
    (+ T5; zeros where the pipeline has none), plain CFG with negative "". Skip-layer guidance is not applied
    (the pipeline's default has none)."""

    kind = "sd3"
    transformer_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    negative_prompt = ""

    def __init__(self, transformer, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3=None,
                 tokenizer_3=None, vae=None, device=None, dtype=None, max_sequence_length: Optional[int] = None):
        super().__init__(transformer, {"text_encoder": text_encoder, "tokenizer": tokenizer,
                                       "text_encoder_2": text_encoder_2, "tokenizer_2": tokenizer_2,
                                       "text_encoder_3": text_encoder_3, "tokenizer_3": tokenizer_3},
                         vae, device, dtype, max_sequence_length)
        cfg = transformer.config
        self.latent_channels = cfg.in_channels
        self.patch_multiple = cfg.patch_size

    def _encode_rows(self, prompts):
        embeds, _, pooled, _ = self._pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return [(embeds[i], pooled[i]) for i in range(len(prompts))]

    def _transformer_velocity(self, x, t, text, hw, guidance_scale):
        embeds, pooled = text
        return self.transformer(
            hidden_states=x,
            timestep=t * 1000,  # the scheduler's timesteps (sigma * 1000); the embedding does not rescale
            encoder_hidden_states=embeds.to(x.dtype),
            pooled_projections=pooled.to(x.dtype),
            return_dict=False,
        )[0]


# ----------------------------------------------------------------------------------------------------
# SANA
# ----------------------------------------------------------------------------------------------------
@register_teacher("sana")
class SanaTeacher(_DiffusersTeacher):
    """SANA (SanaPipeline): timestep 1000 t * config.timestep_scale (the pipeline multiplies, the transformer does
    not), unpacked latents, Gemma-2 with the pipeline's complex human instruction, plain CFG whose negative ""
    is encoded without the instruction, as the pipeline does. A learned-sigma output keeps its first half."""

    kind = "sana"
    transformer_class = "SanaTransformer2DModel"
    pipeline_class = "SanaPipeline"
    text_components = ("text_encoder", "tokenizer")
    negative_prompt = ""

    def __init__(self, transformer, text_encoder, tokenizer, vae=None, device=None, dtype=None,
                 max_sequence_length: Optional[int] = None, complex_human_instruction: Optional[list] = None):
        cfg = transformer.config
        if getattr(cfg, "guidance_embeds", False):
            raise ValueError("a SanaTransformer2DModel with guidance_embeds is SANA-Sprint (TrigFlow timesteps, "
                             "SanaSprintPipeline), not a flow-matching SanaPipeline teacher")
        super().__init__(transformer, {"text_encoder": text_encoder, "tokenizer": tokenizer}, vae, device, dtype,
                         max_sequence_length)
        # None: the pipeline __call__'s default instruction; [] to encode prompts bare
        self.complex_human_instruction = (_call_default(self._pipe.__class__, "complex_human_instruction")
                                          if complex_human_instruction is None else list(complex_human_instruction))
        self.latent_channels = cfg.in_channels
        self.patch_multiple = cfg.patch_size
        self.timestep_scale = float(getattr(cfg, "timestep_scale", 1.0))

    def _encode_rows(self, prompts):
        embeds, mask, _, _ = self._pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, device=self.device, clean_caption=False,
            max_sequence_length=self.max_sequence_length, complex_human_instruction=self.complex_human_instruction)
        return [(embeds[i], mask[i]) for i in range(len(prompts))]

    def _encode_negative_row(self):
        # encode_prompt's own negative branch: no instruction and no token selection, unlike a prompt
        _, _, embeds, mask = self._pipe.encode_prompt(
            [self.negative_prompt], do_classifier_free_guidance=True, negative_prompt=self.negative_prompt,
            device=self.device, clean_caption=False, max_sequence_length=self.max_sequence_length,
            complex_human_instruction=None)
        return embeds[0], mask[0]

    def _transformer_velocity(self, x, t, text, hw, guidance_scale):
        embeds, mask = text
        v = self.transformer(
            x,
            encoder_hidden_states=embeds.to(x.dtype),
            encoder_attention_mask=mask,
            timestep=t * 1000 * self.timestep_scale,
            return_dict=False,
        )[0]
        if v.shape[1] == 2 * self.latent_channels:  # learned sigma: the pipeline keeps the first half
            v = v[:, : self.latent_channels]
        return v

