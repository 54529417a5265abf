"""Reference attention operations in plain PyTorch (reshape + SDPA), plus the one dispatch point.

Everything here exports (torch.export, ONNX, ExecuTorch, Core ML). Faster implementations live in
`pocketdit.attention.backends` and must agree with these references; `blockwise_neighborhood_attention`
is the single place that picks one.

Tensor layout throughout: (batch, heads, tokens, head_dim). Key/value tensors may have fewer heads than
queries (grouped-query attention); the query-head count must be a multiple of theirs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "repeat_kv",
    "attention",
    "check_bna_args",
    "neighbor_block_index",
    "bna_mask",
    "bna_reference",
    "blockwise_neighborhood_attention",
    "BNA_BACKENDS",
]


def repeat_kv(x: torch.Tensor, num_query_heads: int) -> torch.Tensor:
    """Expand (B, H_kv, N, D) to (B, H_q, N, D); query head i reads kv head i // (H_q / H_kv)."""
    heads = x.shape[1]
    if heads == num_query_heads:
        return x
    if num_query_heads % heads:
        raise ValueError(f"{num_query_heads} query heads are not a multiple of {heads} key/value heads")
    rep = num_query_heads // heads
    b, _, n, d = x.shape
    return x[:, :, None].expand(b, heads, rep, n, d).reshape(b, heads * rep, n, d)


def attention(q, k, v, attn_mask=None):
    """Scaled dot-product attention with grouped-query k/v (expanded explicitly, so it exports)."""
    h = q.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, h), repeat_kv(v, h), attn_mask=attn_mask)


def check_bna_args(num_tokens: int, num_blocks: int, radius: int) -> None:
    if num_blocks < 1 or radius < 0:
        raise ValueError(f"need num_blocks >= 1 and radius >= 0, got num_blocks={num_blocks}, radius={radius}")
    if num_tokens % num_blocks:
        raise ValueError(
            f"blockwise neighbourhood attention: {num_tokens} tokens cannot be split into {num_blocks} equal "
            f"blocks; the token count must be a multiple of {num_blocks}"
        )
    if 2 * radius + 1 > num_blocks:
        raise ValueError(
            f"blockwise neighbourhood attention: radius {radius} needs 2*radius+1 = {2 * radius + 1} blocks "
            f"but the sequence has only {num_blocks}"
        )


def neighbor_block_index(num_blocks: int, radius: int, device=None) -> torch.Tensor:
    """(num_blocks, 2r+1) key-block indices per query block.

    Block b attends to blocks b-r..b+r; at the borders the window shifts inward (as NATTEN does) so every
    block sees exactly 2r+1 blocks and all shapes stay static.
    """
    width = 2 * radius + 1
    start = torch.clamp(torch.arange(num_blocks, device=device) - radius, 0, num_blocks - width)
    return start[:, None] + torch.arange(width, device=device)[None, :]


def bna_mask(num_tokens: int, num_blocks: int, radius: int, device=None) -> torch.Tensor:
    """Dense (tokens, tokens) boolean mask of blockwise neighbourhood attention (True = attend)."""
    check_bna_args(num_tokens, num_blocks, radius)
    block = torch.arange(num_tokens, device=device) // (num_tokens // num_blocks)
    start = torch.clamp(block - radius, 0, num_blocks - (2 * radius + 1))
    return (block[None, :] >= start[:, None]) & (block[None, :] <= start[:, None] + 2 * radius)


def bna_reference(q, k, v, num_blocks: int, radius: int):
    """Blockwise neighbourhood attention by gathering each block's 2r+1 neighbour blocks, then one SDPA.

    The reference: simple, differentiable on every device, and it exports (gather + reshape + SDPA). It
    materialises (2r+1) copies of k and v; `pocketdit.attention.backends` has paths that do not.
    """
    b, h, n, d = q.shape
    check_bna_args(n, num_blocks, radius)
    k, v = repeat_kv(k, h), repeat_kv(v, h)
    size = n // num_blocks
    width = 2 * radius + 1
    idx = neighbor_block_index(num_blocks, radius, device=q.device)
    qb = q.reshape(b, h, num_blocks, size, d)
    kn = k.reshape(b, h, num_blocks, size, d)[:, :, idx].reshape(b, h, num_blocks, width * size, d)
    vn = v.reshape(b, h, num_blocks, size, d)[:, :, idx].reshape(b, h, num_blocks, width * size, d)
    return F.scaled_dot_product_attention(qb, kn, vn).reshape(b, h, n, d)


BNA_BACKENDS = ("auto", "reference")


def _exporting() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_exporting") and compiler.is_exporting():
        return True
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting())


def blockwise_neighborhood_attention(q, k, v, num_blocks: int, radius: int, backend: str = "auto"):
    """Blockwise neighbourhood attention on (batch, heads, tokens, head_dim).

    The sequence is split into `num_blocks` equal blocks; block b attends to blocks b-r..b+r, the window
    shifted inward at the borders. `backend` picks an implementation ("reference" or one registered in
    `pocketdit.attention.backends`); "auto" takes the fastest one valid for the inputs and always the
    reference while exporting.
    """
    if backend == "reference" or _exporting():
        return bna_reference(q, k, v, num_blocks, radius)
    from . import backends  # registered fast paths; imported lazily to keep this module dependency-free

    return backends.bna_dispatch(q, k, v, num_blocks, radius, backend)


def score_flops(q_tokens: int, kv_tokens: int, heads: int, head_dim: int, batch: int = 1) -> int:
    """Multiply-add FLOPs of QK^T and PV (2 matmuls x 2 FLOPs per MAC)."""
    return 4 * batch * heads * q_tokens * kv_tokens * head_dim


def softmax_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
