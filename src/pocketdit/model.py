"""PocketDiT: a compact three-stage diffusion transformer (SnapGen++ architecture).

    latents -> patchify -> Down blocks (ASSA, full-res tokens) -> 2x2 merge -> Middle blocks (dense
    attention, U-ViT long skips) -> 2x2 split (+ Down output) -> Up blocks (ASSA) -> unpatchify -> velocity

Reads top to bottom: embedders, the block, token merge/split, the model, then named presets. Choices the
paper leaves open are recorded in docs/architecture.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from . import elastic
from .attention import ATTENTION_TYPES, CrossAttention, SelfAttention, rope_2d


class InvalidResolutionError(ValueError):
    """A latent size the model cannot process (token grid not mergeable 2x2 or not splittable into blocks)."""


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


# ----------------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------------
class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> sinusoidal features (of 1000 t, the usual diffusion scale) -> MLP."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class TextProjection(nn.Module):
    """One text encoder's token states -> the shared cross-attention width (PixArt's caption projection)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TextRefinerBlock(nn.Module):
    """A trainable pre-LN transformer layer over the projected text tokens (HunyuanVideo's token refiner,
    Lumina-Next's context refiner), run once per prompt before cross-attention.

    Why: a frozen sentence encoder's token states name the words well but tie them together weakly ("red" and
    "circle" are two keys, so the denoiser can read the colours of a prompt without reading whose they are);
    a refiner lets training move an attribute or a relation into the token it belongs to. Output projections
    start at zero, so a refiner added to a trained model starts as the identity.
    """

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float = 4.0, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = CrossAttention(dim, dim, dim, head_dim, qk_norm, eps)  # attention of the tokens to themselves
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim, int(round(dim * mlp_ratio)))

    def forward(self, x, mask):
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)
        return x + self.ff(self.norm2(x))


# ----------------------------------------------------------------------------------------------------
# The block
# ----------------------------------------------------------------------------------------------------
class PocketDiTBlock(nn.Module):
    """adaLN-single DiT block: modulated self-attention, cross-attention to text, modulated FFN.

    The six modulation vectors are the global timestep projection plus this block's own learnable table
    (PixArt-alpha's adaLN-single). Cross-attention is pre-normalised but not modulated.
    """

    active_width_key: Optional[str] = None  # set by an elastic supernet running a narrower width (elastic.py)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        mlp_ratio: float,
        attention_type: str,
        cross_attention_dim: int,
        num_blocks: int,
        block_radius: int,
        qk_norm: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.attn = SelfAttention(
            dim, num_heads, num_kv_heads, head_dim, attention_type, num_blocks, block_radius, qk_norm, eps
        )
        self.norm_cross = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = CrossAttention(dim, cross_attention_dim, cross_attention_dim, head_dim, qk_norm, eps)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.ff = FeedForward(dim, int(round(dim * mlp_ratio)))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def modulation_table(self) -> torch.Tensor:
        """The (6, d) table; a supernet's narrower width has its own (elastic.py: private per width)."""
        key = self.active_width_key
        return self.scale_shift_table if key is None else self.scale_shift_tables[key]

    def forward(self, x, t_mod, context, context_mask, rope, height: int, width: int):
        b, _, d = x.shape
        mod = self.modulation_table()[None] + t_mod.view(b, 6, d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, height, width)
        x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        x = x + gate_mlp[:, None] * self.ff(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


# ----------------------------------------------------------------------------------------------------
# Between stages
# ----------------------------------------------------------------------------------------------------
class TokenMerge(nn.Module):
    """2x2 space-to-depth on the token grid, then Linear(4d -> d). Input features ordered (2, 2, d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x, height: int, width: int):
        b, _, d = x.shape
        # Batch folded into the row axis: Core ML accepts tensors of rank <= 5.
        x = x.reshape(b * (height // 2), 2, width // 2, 2, d).permute(0, 2, 1, 3, 4)
        return self.proj(x.reshape(b, (height // 2) * (width // 2), 4 * d))


class TokenSplit(nn.Module):
    """Linear(d -> 4d), then 2x2 depth-to-space back to the full token grid. Output features (2, 2, d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 4 * dim)

    def forward(self, x, height: int, width: int):
        b, _, d = x.shape
        x = self.proj(x).reshape(b * (height // 2), width // 2, 2, 2, d).permute(0, 2, 1, 3, 4)
        return x.reshape(b, height * width, d)


class FinalLayer(nn.Module):
    """adaLN-single output head: modulated LayerNorm, then Linear to patch_size^2 * out_channels."""

    active_width_key: Optional[str] = None
    modulation_table = PocketDiTBlock.modulation_table  # (2, d), private per width in a supernet

    def __init__(self, dim: int, patch_size: int, out_channels: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x, t_emb):
        shift, scale = (self.modulation_table()[None] + t_emb[:, None]).unbind(1)
        return self.linear(modulate(self.norm(x), shift, scale))


@dataclass
class PocketDiTOutput(BaseOutput):
    """sample: predicted velocity (B, C, H, W). features: last Up-block tokens (B, N, d), if asked for."""

    sample: torch.Tensor
    features: Optional[torch.Tensor] = None


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------
class PocketDiT(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Three-stage text-to-image DiT predicting flow-matching velocity.

    Inputs: latents (B, C, H, W); timesteps (B,) in [0, 1] (t=1 is pure noise); text token states, one
    tensor (B, L_i, text_embed_dims[i]) per text encoder (a bare tensor when there is one encoder), with
    optional boolean masks (B, L_i), True for real tokens. Each encoder has its own projection; the
    projected tokens are concatenated token-wise, plus one learned null token so that a prompt whose
    encoders are all dropped (every mask False) still has something to attend to.

    `attention_types` picks the Down/Up token mixer: one of "assa", "dense", "global", "local" for all
    Down/Up layers, or a list with one entry per Down layer then per Up layer. The Middle stage is dense.

    `text_refiner_depth` > 0 adds that many trainable transformer layers over the text tokens before
    cross-attention (TextRefinerBlock): they let training bind attributes and relations to their words.

    LoRA adapters come from diffusers' PeftAdapterMixin (`add_adapter(LoraConfig(...))`, `fuse_lora`,
    `unload_lora`), as for diffusers' own transformers; K-DMD trains through them.

    `elastic_widths` (e.g. (0.375, 0.5, 1.0)) makes the model a width-elastic supernet: `set_width(w)` /
    `at_width(w)` run it at a listed width by slicing its weights, `extract_width(w)` cuts out that width as a
    standalone PocketDiT. See elastic.py.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["PocketDiTBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        out_channels: Optional[int] = None,
        patch_size: int = 2,
        hidden_size: int = 1024,
        num_heads: int = 16,
        num_kv_heads: int = 8,
        head_dim: int = 64,
        depth_down: int = 6,
        depth_mid: int = 8,
        depth_up: int = 10,
        mlp_ratio_down: float = 4.0,
        mlp_ratio_mid: float = 3.0,
        mlp_ratio_up: float = 4.0,
        attention_types: Union[str, Sequence[str]] = "assa",
        num_blocks: int = 16,
        block_radius: int = 1,
        text_embed_dims: Sequence[int] = (512, 2560),
        cross_attention_dim: int = 1344,
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        elastic_widths: Optional[Sequence[float]] = None,
        text_refiner_depth: int = 0,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        types = self._down_up_attention_types(attention_types, depth_down, depth_up)
        if num_heads * head_dim != hidden_size:
            # Not required by the maths, but elastic slicing assumes heads scale with width.
            raise ValueError(f"num_heads * head_dim ({num_heads} * {head_dim}) must equal hidden_size ({hidden_size})")
        if any(t in ("assa", "local") for t in types) and 2 * block_radius + 1 > num_blocks:
            raise ValueError(f"block_radius={block_radius} needs at least {2 * block_radius + 1} blocks, got {num_blocks}")
        self.gradient_checkpointing = False
        d = hidden_size
        self.out_channels = out_channels

        self.patch_embed = nn.Conv2d(in_channels, d, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.text_projections = nn.ModuleList(TextProjection(w, cross_attention_dim) for w in text_embed_dims)
        self.null_text_token = nn.Parameter(torch.zeros(1, 1, cross_attention_dim))
        self.text_refiner = nn.ModuleList(
            TextRefinerBlock(cross_attention_dim, head_dim, qk_norm=qk_norm, eps=norm_eps) for _ in range(text_refiner_depth)
        )

        def block(attention_type, mlp_ratio):
            return PocketDiTBlock(
                d, num_heads, num_kv_heads, head_dim, mlp_ratio, attention_type, cross_attention_dim,
                num_blocks, block_radius, qk_norm, norm_eps,
            )

        self.down_blocks = nn.ModuleList(block(t, mlp_ratio_down) for t in types[:depth_down])
        self.merge = TokenMerge(d)
        self.mid_blocks = nn.ModuleList(block("dense", mlp_ratio_mid) for _ in range(depth_mid))
        self.skip_projections = nn.ModuleList(nn.Linear(2 * d, d) for _ in range(depth_mid // 2))
        self.split = TokenSplit(d)
        self.up_blocks = nn.ModuleList(block(t, mlp_ratio_up) for t in types[depth_down:])
        self.final_layer = FinalLayer(d, patch_size, out_channels, norm_eps)
        self._init_weights()
        self._elastic_widths = None
        if elastic_widths:
            elastic.make_elastic(self, elastic_widths)

    @staticmethod
    def _down_up_attention_types(attention_types, depth_down, depth_up):
        types = [attention_types] * (depth_down + depth_up) if isinstance(attention_types, str) else list(attention_types)
        if len(types) != depth_down + depth_up:
            raise ValueError(
                f"attention_types has {len(types)} entries; need one per Down and Up layer ({depth_down + depth_up})"
            )
        bad = sorted(set(types) - set(ATTENTION_TYPES))
        if bad:
            raise ValueError(f"unknown attention type(s) {bad}; choose from {ATTENTION_TYPES}")
        return types

    def _init_weights(self):
        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(basic)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(lin.weight, std=0.02)
        for ref in self.text_refiner:  # a refiner starts as the identity
            nn.init.zeros_(ref.attn.to_out.weight)
            nn.init.zeros_(ref.ff.fc2.weight)
        for blk in self.blocks():
            if hasattr(blk.attn, "gate"):  # ASSA gate: zero so both branches start at 0.5
                nn.init.zeros_(blk.attn.gate.weight)
            nn.init.zeros_(blk.cross_attn.to_out.weight)  # text conditioning starts as a no-op
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def blocks(self):
        """All DiT blocks in execution order."""
        return [*self.down_blocks, *self.mid_blocks, *self.up_blocks]

    # ------------------------------------------------------------------------------------------------
    # Widths (elastic supernet)
    # ------------------------------------------------------------------------------------------------
    @property
    def elastic_widths(self) -> Optional[tuple]:
        """The widths a supernet runs at (ascending, 1.0 last); None for a plain model."""
        return self._elastic_widths

    @property
    def width(self) -> float:
        """The width the model computes at now (1.0 unless a supernet was set narrower)."""
        return getattr(self, "_width", 1.0)

    def set_width(self, width: float) -> "PocketDiT":
        """Run this supernet at `width`, one of `elastic_widths`; an unlisted width is an error naming them."""
        elastic.set_width(self, width)
        return self

    def at_width(self, width: float):
        """Context manager: `with model.at_width(0.5): model(...)`, the previous width restored on exit."""
        return elastic.at_width(self, width)

    def extract_width(self, width: float) -> "PocketDiT":
        """A standalone PocketDiT (own config, exactly its own parameters) equal to this supernet at `width`."""
        return elastic.extract_width(self, width)

    # ------------------------------------------------------------------------------------------------
    # Sizes
    # ------------------------------------------------------------------------------------------------
    @property
    def latent_multiple(self) -> int:
        """Latent height and width must be multiples of this (patchify, then the 2x2 merge)."""
        return 2 * self.config.patch_size

    def _uses_blocks(self) -> bool:
        return any(b.attn.kind in ("assa", "local") for b in (*self.down_blocks, *self.up_blocks))

    def is_valid_latent_size(self, height: int, width: int) -> bool:
        m = self.latent_multiple
        if height < m or width < m or height % m or width % m:
            return False
        tokens = (height // self.config.patch_size) * (width // self.config.patch_size)
        return not self._uses_blocks() or tokens % self.config.num_blocks == 0

    def valid_latent_sizes_near(self, height: int, width: int, count: int = 4) -> list[tuple[int, int]]:
        m = self.latent_multiple

        def around(n):  # multiples of m within 8 steps of n (a size off the grid still has neighbours)
            return range(max(m, (n // m - 8) * m), (n // m + 9) * m + 1, m)

        cands = {(h, w) for h in around(height) for w in around(width) if self.is_valid_latent_size(h, w)}
        return sorted(cands, key=lambda s: (abs(s[0] - height) + abs(s[1] - width), s))[:count]

    def check_latent_size(self, height: int, width: int) -> None:
        if self.is_valid_latent_size(height, width):
            return
        p, m, nb = self.config.patch_size, self.latent_multiple, self.config.num_blocks
        rule = f"height and width multiples of {m} (patch {p} x 2x2 merge)"
        if self._uses_blocks():
            rule += f", and (height/{p})*(width/{p}) tokens divisible by num_blocks={nb}"
        near = ", ".join(f"{h}x{w}" for h, w in self.valid_latent_sizes_near(height, width))
        raise InvalidResolutionError(
            f"latent size {height}x{width} is not valid for this PocketDiT: it needs {rule}. "
            f"Nearest valid latent sizes: {near}"
        )

    # ------------------------------------------------------------------------------------------------
    # Forward
    # ------------------------------------------------------------------------------------------------
    def encode_text(self, encoder_hidden_states, encoder_attention_mask=None):
        """Project each encoder's tokens, concatenate token-wise, append the null token -> (context, mask)."""
        states = [encoder_hidden_states] if torch.is_tensor(encoder_hidden_states) else list(encoder_hidden_states)
        if encoder_attention_mask is None:
            masks = [None] * len(states)
        else:
            masks = [encoder_attention_mask] if torch.is_tensor(encoder_attention_mask) else list(encoder_attention_mask)
        dims = list(self.config.text_embed_dims)
        got = [s.shape[-1] for s in states]
        if got != dims or len(masks) != len(states):
            raise ValueError(
                f"expected {len(dims)} text tensor(s) with widths {dims} (and one mask per tensor), got widths {got} "
                f"and {len(masks)} mask(s)"
            )
        b = states[0].shape[0]
        ctx, msk = [], []
        for proj, s, m in zip(self.text_projections, states, masks):
            ctx.append(proj(s.to(proj.linear_1.weight.dtype)))
            msk.append(torch.ones(s.shape[:2], dtype=torch.bool, device=s.device) if m is None else m.bool())
        ctx.append(self.null_text_token.expand(b, 1, -1).to(ctx[0].dtype))
        msk.append(torch.ones(b, 1, dtype=torch.bool, device=ctx[0].device))
        context, mask = torch.cat(ctx, dim=1), torch.cat(msk, dim=1)
        for ref in self.text_refiner:
            context = ref(context, mask)
        return context, mask

    def set_attention_backend(self, backend: str) -> None:
        """Pick the BNA/ASSA implementation of every Down/Up attention layer (diffusers' method name).

        "auto" (the default: FlexAttention on CUDA, `strided` elsewhere, the reference while exporting) or a name
        from `pocketdit.attention.backends.available_backends()` ("reference" among them). Small token counts train
        faster on a GPU with "strided" (plain SDPA) than with FlexAttention, which compiles once per shape.
        """
        from .attention.backends import backend_choices
        from .attention.layers import SelfAttention

        if backend not in backend_choices():
            raise ValueError(f"unknown attention backend {backend!r}; choose from {backend_choices()}")
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.backend = backend

    def _run(self, block, *args):
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states,
        encoder_attention_mask=None,
        return_dict: bool = True,
        output_features: bool = False,
    ):
        b, _, height, width = hidden_states.shape
        self.check_latent_size(height, width)
        p = self.config.patch_size
        gh, gw = height // p, width // p
        if timestep.ndim == 0:
            timestep = timestep.expand(b)

        x = self.patch_embed(hidden_states).flatten(2).transpose(1, 2)  # (B, N, d)
        t_emb = self.t_embedder(timestep)
        t_mod = self.t_block(t_emb)
        context, context_mask = self.encode_text(encoder_hidden_states, encoder_attention_mask)
        hd, theta = self.config.head_dim, self.config.rope_theta
        rope_full = rope_2d(gh, gw, hd, theta, device=x.device, dtype=x.dtype)
        rope_half = rope_2d(gh // 2, gw // 2, hd, theta, device=x.device, dtype=x.dtype)

        for blk in self.down_blocks:
            x = self._run(blk, x, t_mod, context, context_mask, rope_full, gh, gw)
        down_out = x

        x = self.merge(x, gh, gw)
        # U-ViT long skips: the input of Middle block k joins the input of block depth - 1 - k, so each skip
        # carries an activation from earlier in the stage (block 0's input is the merged Down output). With
        # outputs instead, the innermost skip would join a block's output with itself.
        depth, n_skip = len(self.mid_blocks), len(self.skip_projections)
        skips = []
        for i, blk in enumerate(self.mid_blocks):
            if i < n_skip:
                skips.append(x)
            j = i - (depth - n_skip)
            if j >= 0:
                x = self.skip_projections[j](torch.cat([x, skips.pop()], dim=-1))
            x = self._run(blk, x, t_mod, context, context_mask, rope_half, gh // 2, gw // 2)

        x = self.split(x, gh, gw) + down_out
        for blk in self.up_blocks:
            x = self._run(blk, x, t_mod, context, context_mask, rope_full, gh, gw)
        features = x

        x = self.final_layer(x, t_emb)  # (B, N, p*p*C)
        c = self.out_channels
        x = x.reshape(b * gh, gw, p, p, c).permute(0, 2, 1, 3, 4).reshape(b, height * width, c)
        x = x.transpose(1, 2).reshape(b, c, height, width)
        if not return_dict:
            return (x, features) if output_features else (x,)
        return PocketDiTOutput(sample=x, features=features if output_features else None)

    # ------------------------------------------------------------------------------------------------
    # Presets
    # ------------------------------------------------------------------------------------------------
    @classmethod
    def preset_config(cls, name: str, **overrides) -> dict:
        if name not in PRESETS:
            raise ValueError(f"unknown PocketDiT preset {name!r}; choose from {sorted(PRESETS)}")
        cfg = dict(PRESETS[name])
        unknown = sorted(set(overrides) - set(cls._init_signature()))
        if unknown:
            raise ValueError(f"unknown PocketDiT config key(s) {unknown}; valid keys: {sorted(cls._init_signature())}")
        cfg.update(overrides)
        return cfg

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "PocketDiT":
        """Build a named preset ("full", "small", "tiny", "nano"); keyword arguments override config fields."""
        return cls(**cls.preset_config(name, **overrides))

    @classmethod
    def _init_signature(cls):
        import inspect

        return [k for k in inspect.signature(cls.__init__).parameters if k != "self"]


# Widths of the paper's text encoders: TinyCLIP text tower (512) and Gemma-3-4b-it (2560).
PAPER_TEXT_DIMS = (512, 2560)

PRESETS: dict[str, dict] = {
    # 1.6B supernet: small and tiny are its 0.5x and 0.375x widths (heads scale with width, group size 2).
    "full": dict(hidden_size=2048, num_heads=32, num_kv_heads=16, text_embed_dims=PAPER_TEXT_DIMS),
    # 0.4B: the paper's ablated architecture (D): 16 heads of 64, 8 KV heads.
    "small": dict(hidden_size=1024, num_heads=16, num_kv_heads=8, text_embed_dims=PAPER_TEXT_DIMS),
    "tiny": dict(hidden_size=768, num_heads=12, num_kv_heads=6, text_embed_dims=PAPER_TEXT_DIMS),
    # Seconds on a CPU: 16x16 latents, one encoder of width 32.
    "nano": dict(
        in_channels=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, depth_down=1, depth_mid=2,
        depth_up=1, num_blocks=4, text_embed_dims=(32,), cross_attention_dim=64,
    ),
}
