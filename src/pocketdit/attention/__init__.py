"""Attention for PocketDiT: reference operations, fast backends behind one dispatch, and layers."""

from .backends import adaptive_sparse_attention, blockwise_neighborhood_attention
from .functional import assa_reference, attention, bna_mask, bna_reference, neighbor_block_index, repeat_kv
from .layers import ATTENTION_TYPES, CrossAttention, KVCompression, SelfAttention, apply_rope, rope_2d

__all__ = [
    "ATTENTION_TYPES",
    "CrossAttention",
    "KVCompression",
    "SelfAttention",
    "adaptive_sparse_attention",
    "apply_rope",
    "assa_reference",
    "attention",
    "blockwise_neighborhood_attention",
    "bna_mask",
    "bna_reference",
    "neighbor_block_index",
    "repeat_kv",
    "rope_2d",
]
