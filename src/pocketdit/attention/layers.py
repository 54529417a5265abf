"""Attention layers of PocketDiT: 2D RoPE, KV compression, dense self-attention, ASSA, cross-attention.

Width-dependent weights are laid out so that a narrower model is a leading slice: query heads are
grouped by key/value head (query head i reads kv head i // group), so the first k query heads use the
first k / group kv heads, and every projection's head axis is outermost.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import adaptive_sparse_attention, blockwise_neighborhood_attention
from .functional import attention

ATTENTION_TYPES = ("assa", "dense", "global", "local")


# ----------------------------------------------------------------------------------------------------
# Rotary position embedding on a 2D token grid
# ----------------------------------------------------------------------------------------------------
def rope_2d(height: int, width: int, head_dim: int, theta: float = 10000.0, device=None, dtype=torch.float32):
    """cos/sin tables of shape (height*width, head_dim) for axial 2D RoPE (row-major tokens).

    Half of the rotation pairs encode the row index, half the column index (rotate-half convention).
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    pairs = head_dim // 4
    freqs = 1.0 / (theta ** (torch.arange(pairs, device=device, dtype=torch.float32) / pairs))
    rows = torch.arange(height, device=device, dtype=torch.float32)
    cols = torch.arange(width, device=device, dtype=torch.float32)
    ang_r = torch.outer(rows, freqs)[:, None, :].expand(height, width, pairs)
    ang_c = torch.outer(cols, freqs)[None, :, :].expand(height, width, pairs)
    ang = torch.cat([ang_r, ang_c], dim=-1).reshape(height * width, head_dim // 2)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, N, D) by position tables (N, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


# ----------------------------------------------------------------------------------------------------
# KV compression (global branch of ASSA)
# ----------------------------------------------------------------------------------------------------
class KVCompression(nn.Module):
    """Depthwise 2x2 stride-2 conv over a (B, heads, H*W, D) key or value map -> (B, heads, H*W/4, D).

    Initialised to averaging (weights 1/4, bias 0), as PixArt-Sigma's KV compression, so a fresh model's
    global branch attends to 2x2 average-pooled keys and values. Depthwise = per head and channel, so it
    slices with the head axis.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=2, stride=2, groups=channels)
        nn.init.constant_(self.conv.weight, 0.25)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        # The conv written out as a weighted sum over each 2x2 window, directly in the (B, heads, N, D)
        # layout: no permute to channels-first and back, and on CPU it is ~5x faster (forward and
        # backward) than a depthwise Conv2d with 4-element kernels. Same weights, same result as self.conv
        # on the channels-first grid (channel = head * D + d).
        b, h, n, d = x.shape
        if n != height * width or height % 2 or width % 2:
            raise ValueError(f"KV compression needs an even height x width grid of {n} tokens, got {height}x{width}")
        # (batch*heads, row pair, 2, column pair, 2*D): the two columns of a window are adjacent in
        # memory. Every intermediate stays rank <= 5 (Core ML's limit).
        hh, ww = height // 2, width // 2
        windows = x.reshape(b * h, hh, 2, ww, 2 * d)
        # The first h heads' channels: all of them, or a narrower width of an elastic supernet (elastic.py).
        weight = self.conv.weight[: h * d].view(h, d, 2, 2).permute(0, 2, 3, 1)  # (heads, row i, column j, D)
        top = windows[:, :, 0].reshape(b, h, hh, ww, 2 * d)
        bottom = windows[:, :, 1].reshape(b, h, hh, ww, 2 * d)
        rows = top * weight[:, 0].reshape(1, h, 1, 1, 2 * d) + bottom * weight[:, 1].reshape(1, h, 1, 1, 2 * d)
        rows = rows.reshape(b * h, hh, ww, 2, d)
        out = (rows[..., 0, :] + rows[..., 1, :]).reshape(b, h, n // 4, d)
        return out + self.conv.bias[: h * d].view(1, h, 1, d)


# ----------------------------------------------------------------------------------------------------
# Self-attention: dense and adaptive sparse
# ----------------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention with GQA, per-head QK-LayerNorm and 2D RoPE.

    `kind` selects the token mixer over the (height x width) grid:
      dense  - full attention over all tokens;
      assa   - adaptive sparse self-attention: global branch (queries over 2x2-compressed k/v) and local
               branch (blockwise neighbourhood attention), mixed per head by sigmoid(Linear(x));
      global - the global branch alone;  local - the local branch alone (ablations).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        kind: str = "dense",
        num_blocks: int = 16,
        block_radius: int = 1,
        qk_norm: bool = True,
        eps: float = 1e-6,
    ):
        super().__init__()
        if kind not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention type {kind!r}; choose from {ATTENTION_TYPES}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        self.kind = kind
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.num_blocks, self.block_radius = num_blocks, block_radius
        # BNA/ASSA implementation: "auto" (fast path for the device, reference while exporting) or a name
        # from attention.backends.available_backends(); see attention.backends.adaptive_sparse_attention
        self.backend = "auto"
        self.to_q = nn.Linear(dim, num_heads * head_dim)
        self.to_k = nn.Linear(dim, num_kv_heads * head_dim)
        self.to_v = nn.Linear(dim, num_kv_heads * head_dim)
        self.norm_q = nn.LayerNorm(head_dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = nn.LayerNorm(head_dim, eps=eps) if qk_norm else nn.Identity()
        if kind in ("assa", "global"):
            self.compress_k = KVCompression(num_kv_heads * head_dim)
            self.compress_v = KVCompression(num_kv_heads * head_dim)
        if kind == "assa":
            self.gate = nn.Linear(dim, num_heads)  # zero-init: both branches start with weight 0.5
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        self.to_out = nn.Linear(num_heads * head_dim, dim)

    def _heads(self, x):
        # heads from the width (not self.num_heads): a supernet's narrower width has fewer (elastic.py)
        b, n, _ = x.shape
        return x.view(b, n, -1, self.head_dim).transpose(1, 2)

    def project_qkv(self, x, rope):
        q = self.norm_q(self._heads(self.to_q(x)))
        k = self.norm_k(self._heads(self.to_k(x)))
        v = self._heads(self.to_v(x))
        cos, sin = rope
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def global_branch(self, q, k, v, height, width):
        return attention(q, self.compress_k(k, height, width), self.compress_v(v, height, width))

    def local_branch(self, q, k, v):
        return blockwise_neighborhood_attention(q, k, v, self.num_blocks, self.block_radius, self.backend)

    def forward(self, x: torch.Tensor, rope, height: int, width: int) -> torch.Tensor:
        q, k, v = self.project_qkv(x, rope)
        if self.kind == "dense":
            out = attention(q, k, v)
        elif self.kind == "global":
            out = self.global_branch(q, k, v, height, width)
        elif self.kind == "local":
            out = self.local_branch(q, k, v)
        else:
            g = torch.sigmoid(self.gate(x)).transpose(1, 2).unsqueeze(-1)  # (B, heads, N, 1)
            k_c, v_c = self.compress_k(k, height, width), self.compress_v(v, height, width)
            # Both branches and the gate mix in one call, so a backend can fuse them (see backends.py).
            out = adaptive_sparse_attention(q, k, v, k_c, v_c, g, self.num_blocks, self.block_radius, self.backend)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class CrossAttention(nn.Module):
    """Attention from image tokens to text tokens.

    Its inner width (`inner_dim`) is fixed across elastic widths: key/value projections read the text and
    are never sliced; the query projection slices its input columns and the output its rows.
    """

    def __init__(self, dim: int, context_dim: int, inner_dim: int, head_dim: int, qk_norm=True, eps=1e-6):
        super().__init__()
        if inner_dim % head_dim:
            raise ValueError(f"cross-attention inner_dim={inner_dim} must be a multiple of head_dim={head_dim}")
        self.num_heads, self.head_dim = inner_dim // head_dim, head_dim
        self.to_q = nn.Linear(dim, inner_dim)
        self.to_k = nn.Linear(context_dim, inner_dim)
        self.to_v = nn.Linear(context_dim, inner_dim)
        self.norm_q = nn.LayerNorm(head_dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = nn.LayerNorm(head_dim, eps=eps) if qk_norm else nn.Identity()
        self.to_out = nn.Linear(inner_dim, dim)

    def forward(self, x, context, mask=None):
        """x (B, N, dim); context (B, L, context_dim); mask (B, L) bool, True = attend."""
        b, n, _ = x.shape
        split = lambda t: t.view(b, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        q = self.norm_q(split(self.to_q(x)))
        k = self.norm_k(split(self.to_k(context)))
        v = split(self.to_v(context))
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))
