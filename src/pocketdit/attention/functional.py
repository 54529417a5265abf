"""Reference attention operations in plain PyTorch (reshape + SDPA).

Everything here exports (torch.export, ONNX, ExecuTorch, Core ML) and imports nothing from the package:
these are the definitions. Faster implementations, and the dispatch that picks one of them or these,
live in `pocketdit.attention.backends` and must agree with the references.

Tensor layout throughout: (batch, heads, tokens, head_dim). Key/value tensors may have fewer heads than
queries (grouped-query attention); the query-head count must be a multiple of theirs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "is_exporting",
    "repeat_kv",
    "attention",
    "check_bna_args",
    "neighbor_block_index",
    "bna_mask",
    "bna_reference",
    "assa_reference",
]


def is_exporting() -> bool:
    """True inside torch.export / ONNX / TorchScript tracing, where only plain ops may be recorded."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_exporting") and compiler.is_exporting():
        return True
    return bool(torch.jit.is_tracing() or torch.jit.is_scripting())


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
    """Scaled dot-product attention with grouped-query k/v.

    Eagerly, SDPA's `enable_gqa` reads the shared kv heads in place; while exporting, k/v are expanded
    explicitly (plain ops every exporter understands). Both give the same result.
    """
    h = q.shape[1]
    if k.shape[1] != h and not is_exporting():
        if h % k.shape[1]:
            raise ValueError(f"{h} query heads are not a multiple of {k.shape[1]} key/value heads")
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
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
    # Batch and heads folded together: the gather stays rank 5 and SDPA sees 4-D tensors (Core ML
    # accepts rank <= 5; ONNX's dynamo exporter wants 4-D attention).
    qb = q.reshape(b * h, num_blocks, size, d)
    kn = k.reshape(b * h, num_blocks, size, d)[:, idx].reshape(b * h, num_blocks, width * size, d)
    vn = v.reshape(b * h, num_blocks, size, d)[:, idx].reshape(b * h, num_blocks, width * size, d)
    # contiguous(): export lowering otherwise turns this reshape into a view that SDPA's output strides forbid
    return F.scaled_dot_product_attention(qb, kn, vn).contiguous().reshape(b, h, n, d)


def assa_reference(q, k, v, k_compressed, v_compressed, gate, num_blocks: int, radius: int):
    """Adaptive sparse self-attention from its two branches, the reference way.

    gate * global + (1 - gate) * local, where global attends to the compressed keys/values (B, H_kv, N_c, D)
    and local is blockwise neighbourhood attention over the full ones; `gate` broadcasts against
    (B, H, N, D), typically (B, H, N, 1) = sigmoid(Linear(x)). The two attentions are normalised
    separately, so they cannot share one softmax; fast paths recombine them instead.
    """
    glob = attention(q, k_compressed, v_compressed)
    local = bna_reference(q, k, v, num_blocks, radius)
    return gate * glob + (1 - gate) * local

