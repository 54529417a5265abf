"""The three tensor-in/tensor-out graphs that go on a device, with static shapes.

    text_encoder(input_ids int32 (B, L), attention_mask int32 (B, L)) -> states float (B, L, D)
    denoiser(latents (B, C, h, w), timestep (B,), states_1..states_k, mask_1..mask_k) -> velocity (B, C, h, w)
    decoder(latents (B, C, h, w)) -> image (B, 3, H, W) in [-1, 1]

Tokenization, the sampler loop (a few multiply-adds a step) and the pixel post-processing stay in the host
language. Masks cross the graph boundary as float 0/1 and token ids as int32, because Core ML takes
neither bool nor int64 inputs; the graphs convert them inside. One denoiser graph is one network width and
one step: the host calls it N times.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn


@contextlib.contextmanager
def _rope_from(tables: dict):
    """Inside: `pocketdit.model.rope_2d` returns the given precomputed tables for their grid sizes."""
    from .. import model as model_module

    original = model_module.rope_2d

    def rope_2d(height, width, head_dim, theta=10000.0, device=None, dtype=torch.float32):
        key = (int(height), int(width))
        if key in tables:
            cos, sin = tables[key]
            return cos.to(dtype), sin.to(dtype)
        return original(height, width, head_dim, theta, device=device, dtype=dtype)

    model_module.rope_2d = rope_2d
    try:
        yield
    finally:
        model_module.rope_2d = original


class DenoiserGraph(nn.Module):
    """PocketDiT with a flat positional signature: (latents, timestep, *states, *masks) -> velocity.

    Export-time rewrite: the 2D RoPE tables of the (static) token grids are computed once here and enter
    the graph as constants, so the device does not rebuild them every call, and Core ML's converter (which
    types `arange` by its values, as int32) never sees the float `outer` inside `rope_2d`.
    """

    def __init__(self, model: nn.Module, latent_size: Optional[int] = None):
        super().__init__()
        self.model = model.eval()
        self.num_encoders = len(model.config.text_embed_dims)
        self._grids = []
        if latent_size is not None:
            from ..attention import rope_2d

            cfg = model.config
            grid = latent_size // cfg.patch_size
            for i, g in enumerate((grid, grid // 2)):
                cos, sin = rope_2d(g, g, cfg.head_dim, cfg.rope_theta)
                self.register_buffer(f"rope_cos_{i}", cos, persistent=False)
                self.register_buffer(f"rope_sin_{i}", sin, persistent=False)
                self._grids.append(g)

    def forward(self, latents, timestep, *text):
        k = self.num_encoders
        if len(text) != 2 * k:
            raise ValueError(f"denoiser graph takes {k} text state tensor(s) then {k} mask(s), got {len(text)} tensors")
        states, masks = list(text[:k]), [m > 0.5 for m in text[k:]]
        if k == 1:
            states, masks = states[0], masks[0]
        tables = {(g, g): (getattr(self, f"rope_cos_{i}"), getattr(self, f"rope_sin_{i}")) for i, g in enumerate(self._grids)}
        with _rope_from(tables):
            return self.model(latents, timestep, states, masks, return_dict=False)[0]


class TextEncoderGraph(nn.Module):
    """A pocketdit.text.TextEncoder's network: (input_ids, attention_mask) -> token states (float32)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder._forward_tokens(input_ids.long(), attention_mask.long()).float()


class DecoderGraph(nn.Module):
    """An autoencoder's decode: latents -> image in [-1, 1]."""

    def __init__(self, autoencoder):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, latents):
        return self.autoencoder.decode(latents)


class DecomposedLayerNorm(nn.Module):
    """LayerNorm written as mean / subtract / mean of squares / rsqrt (same maths, same parameters).

    ExecuTorch's XNNPACK delegate has no LayerNorm but does take these ops, so with this rewrite a
    transformer block stays in one delegated partition instead of being cut at every norm.
    """

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x):
        centred = x - x.mean(-1, keepdim=True)
        y = centred * torch.rsqrt((centred * centred).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


def decompose_layer_norms(module: nn.Module) -> nn.Module:
    """Replace every last-dimension nn.LayerNorm in `module` (in place) by DecomposedLayerNorm."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1:
                setattr(parent, name, DecomposedLayerNorm(child))
    return module


@dataclass
class GraphSpec:
    """One graph to export: its module, example inputs (static shapes) and the names of its inputs/outputs."""

    name: str
    module: nn.Module
    example_inputs: tuple
    input_names: Sequence[str]
    output_names: Sequence[str]


def denoiser_spec(model, latent_size: int, batch_size: int = 1, text_lengths: Optional[Sequence[int]] = None, seed: int = 0):
    """The denoiser graph at one latent size, with random example inputs (half the text tokens padded)."""
    model.check_latent_size(latent_size, latent_size)
    dims = list(model.config.text_embed_dims)
    lengths = list(text_lengths or [16] * len(dims))
    if len(lengths) != len(dims):
        raise ValueError(f"need one text length per encoder ({len(dims)}), got {lengths}")
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch_size, model.config.in_channels, latent_size, latent_size, generator=g)
    timestep = torch.rand(batch_size, generator=g)
    states = [torch.randn(batch_size, n, d, generator=g) for n, d in zip(lengths, dims)]
    masks = [(torch.arange(n)[None] < (n + 1) // 2).float().expand(batch_size, n).contiguous() for n in lengths]
    k = len(dims)
    names = ["latents", "timestep"] + [f"text_states_{i}" for i in range(k)] + [f"text_mask_{i}" for i in range(k)]
    return GraphSpec("denoiser", DenoiserGraph(model, latent_size), (latents, timestep, *states, *masks), names, ["velocity"])


def text_encoder_spec(encoder, batch_size: int = 1, seed: int = 0, index: int = 0):
    """The text encoder graph at its max_length, with random token ids (vocab of the encoder's model)."""
    length = encoder.max_length
    vocab = int(getattr(getattr(encoder.model, "config", None), "vocab_size", 1000))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch_size, length), generator=g, dtype=torch.int64).to(torch.int32)
    mask = (torch.arange(length)[None] < max(2, length // 2)).to(torch.int32).expand(batch_size, length).contiguous()
    name = "text_encoder" if index == 0 else f"text_encoder_{index}"
    return GraphSpec(name, TextEncoderGraph(encoder).eval(), (ids, mask), ["input_ids", "attention_mask"], ["text_states"])


def decoder_spec(autoencoder, latent_size: int, batch_size: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch_size, autoencoder.latent_channels, latent_size, latent_size, generator=g)
    module = DecoderGraph(autoencoder)
    module.eval()
    return GraphSpec("decoder", module, (latents,), ["latents"], ["image"])


def fresh_inputs(spec: GraphSpec, seed: int) -> tuple:
    """New random inputs with the example's shapes and dtypes (parity is checked on these, not the examples)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, x in zip(spec.input_names, spec.example_inputs):
        if name.startswith("text_mask") or name == "attention_mask":
            n = x.shape[-1]
            lengths = torch.randint(1, n + 1, (x.shape[0],), generator=g)
            if name == "attention_mask":
                lengths = lengths.clamp(min=2)
            out.append((torch.arange(n)[None] < lengths[:, None]).to(x.dtype))
        elif name == "input_ids":
            out.append(torch.randint(1, int(x.max()) + 1, x.shape, generator=g, dtype=torch.int64).to(x.dtype))
        elif name == "timestep":
            out.append(torch.rand(x.shape, generator=g))
        else:
            out.append(torch.randn(x.shape, generator=g, dtype=x.dtype))
    return tuple(out)


Runner = Callable[..., torch.Tensor]
