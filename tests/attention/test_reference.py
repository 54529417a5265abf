"""The reference attention operations agree with dense attention under explicitly built masks."""

import pytest
import torch
import torch.nn.functional as F

from pocketdit.attention import (
    KVCompression,
    SelfAttention,
    apply_rope,
    attention,
    bna_mask,
    bna_reference,
    blockwise_neighborhood_attention,
    neighbor_block_index,
    rope_2d,
)


def explicit_bna_mask(tokens, blocks, radius):
    """Built token by token from the definition, independent of the library's index maths."""
    size = tokens // blocks
    mask = torch.zeros(tokens, tokens, dtype=torch.bool)
    for qb in range(blocks):
        lo = qb - radius
        hi = qb + radius
        if lo < 0:  # shift the window inward at the borders
            lo, hi = 0, 2 * radius
        if hi > blocks - 1:
            lo, hi = blocks - 1 - 2 * radius, blocks - 1
        mask[qb * size:(qb + 1) * size, lo * size:(hi + 1) * size] = True
    return mask


def qkv(b=2, h=4, n=64, d=16, kv_heads=None, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    k = torch.randn(b, kv_heads or h, n, d, generator=g)
    v = torch.randn(b, kv_heads or h, n, d, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


@pytest.mark.parametrize("tokens,blocks,radius", [(64, 4, 1), (64, 8, 1), (96, 6, 2), (64, 16, 1), (48, 3, 1), (60, 5, 0)])
def test_bna_equals_masked_dense_attention(tokens, blocks, radius):
    q, k, v = qkv(n=tokens)
    mask = explicit_bna_mask(tokens, blocks, radius)
    assert torch.equal(bna_mask(tokens, blocks, radius), mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(bna_reference(q, k, v, blocks, radius), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(blockwise_neighborhood_attention(q, k, v, blocks, radius), expected, atol=1e-5, rtol=1e-5)


def test_border_blocks_see_exactly_2r_plus_1_blocks():
    idx = neighbor_block_index(8, 2)
    assert idx.shape == (8, 5)
    assert idx[0].tolist() == [0, 1, 2, 3, 4]  # shifted right at the left border
    assert idx[7].tolist() == [3, 4, 5, 6, 7]  # shifted left at the right border
    assert idx[4].tolist() == [2, 3, 4, 5, 6]  # centred inside


def test_bna_with_all_blocks_in_window_is_full_attention():
    q, k, v = qkv(n=80)
    torch.testing.assert_close(bna_reference(q, k, v, 5, 2), F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_bna_grouped_query_heads_match_repeated_kv():
    q, k, v = qkv(h=8, kv_heads=2)
    rep = lambda t: t.repeat_interleave(4, dim=1)
    torch.testing.assert_close(bna_reference(q, k, v, 4, 1), bna_reference(q, rep(k), rep(v), 4, 1))


def test_bna_gradients_flow_and_match_masked_dense():
    q, k, v = qkv(n=32, grad=True)
    bna_reference(q, k, v, 4, 1).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    assert all(g.abs().sum() > 0 for g in grads)
    q2, k2, v2 = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    F.scaled_dot_product_attention(q2, k2, v2, attn_mask=explicit_bna_mask(32, 4, 1)).square().sum().backward()
    for g, t in zip(grads, (q2, k2, v2)):
        torch.testing.assert_close(g, t.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens,blocks,radius,match", [(30, 4, 1, "multiple of 4"), (32, 4, 2, "5 blocks")])
def test_bna_bad_arguments_are_clear_errors(tokens, blocks, radius, match):
    q, k, v = qkv(n=tokens)
    with pytest.raises(ValueError, match=match):
        bna_reference(q, k, v, blocks, radius)


def test_global_branch_at_init_is_attention_over_average_pooled_kv():
    height, width, heads, d = 6, 8, 4, 16
    q, k, v = qkv(h=heads, n=height * width, d=d)
    comp = KVCompression(heads * d)
    pool = lambda t: F.avg_pool2d(t.transpose(2, 3).reshape(2, heads * d, height, width), 2).reshape(2, heads, d, -1).transpose(2, 3)
    torch.testing.assert_close(comp(k, height, width), pool(k), atol=1e-6, rtol=1e-6)
    out = attention(q, comp(k, height, width), comp(v, height, width))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, pool(k), pool(v)), atol=1e-5, rtol=1e-5)


def make_assa(kind="assa"):
    torch.manual_seed(0)
    return SelfAttention(dim=32, num_heads=4, num_kv_heads=2, head_dim=8, kind=kind, num_blocks=4, block_radius=1)


@pytest.mark.parametrize("bias,branch", [(float("inf"), "global"), (float("-inf"), "local")])
def test_assa_with_gate_forced_equals_single_branch(bias, branch):
    height, width = 4, 8
    x = torch.randn(2, height * width, 32)
    rope = rope_2d(height, width, 8)
    assa = make_assa("assa")
    with torch.no_grad():
        torch.nn.init.normal_(assa.compress_k.conv.weight)  # a trained-looking conv, not plain averaging
        assa.gate.bias.fill_(bias)
    single = make_assa(branch)
    single.load_state_dict({k: v for k, v in assa.state_dict().items() if not k.startswith("gate")}, strict=False)
    torch.testing.assert_close(assa(x, rope, height, width), single(x, rope, height, width), atol=1e-6, rtol=1e-6)


def test_assa_gate_starts_at_half_and_mixes_per_head():
    height, width = 4, 8
    x = torch.randn(2, height * width, 32)
    rope = rope_2d(height, width, 8)
    assa, glob, loc = make_assa("assa"), make_assa("global"), make_assa("local")
    sd = {k: v for k, v in assa.state_dict().items() if not k.startswith("gate")}
    glob.load_state_dict(sd, strict=False)
    loc.load_state_dict(sd, strict=False)
    # to_out is linear, so at g = 0.5 the output is the mean of the two branches' outputs (bias counted once).
    bias = assa.to_out.bias
    expected = 0.5 * (glob(x, rope, height, width) - bias) + 0.5 * (loc(x, rope, height, width) - bias) + bias
    torch.testing.assert_close(assa(x, rope, height, width), expected, atol=1e-5, rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_2d(5, 7, 16)
    q = torch.randn(16)
    k = torch.randn(16)
    rot = lambda x, i: apply_rope(x.view(1, 1, 1, 16), cos[i], sin[i]).view(16)
    grid = lambda r, c: r * 7 + c
    s1 = rot(q, grid(1, 2)) @ rot(k, grid(2, 4))
    s2 = rot(q, grid(3, 3)) @ rot(k, grid(4, 5))  # same (+1, +2) offset
    s3 = rot(q, grid(3, 3)) @ rot(k, grid(3, 5))  # different offset
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(s1, s3, atol=1e-3)
