"""Fast implementations of blockwise neighbourhood attention (BNA) and ASSA, and the one dispatch point.

`blockwise_neighborhood_attention` and `adaptive_sparse_attention` are what the layers call; they pick a
backend below. Every backend computes exactly what `functional.bna_reference` /
`functional.assa_reference` compute
(tests prove it to 1e-4 relative error in fp32); they differ only in how the work is laid out.

  reference  gather each block's 2r+1 neighbour blocks (a (2r+1)x copy of k and v), then one SDPA call.
             Plain ops; the export path.
  strided    the neighbour window of a query block is a *contiguous* run of 2r+1 blocks in the token
             sequence, so all windows are one `Tensor.unfold` view of k/v (stride = one block, no copy).
             Interior blocks go through one SDPA call over that view; the 2(r+1) border blocks (whose
             windows are shifted inward and hence shared) through a second call over another view.
             Grouped-query heads go to SDPA's `enable_gqa` instead of being repeated. Differentiable on
             every device (SDPA's own backward, `unfold`'s backward sums the overlapping windows), so it
             is the CPU default for training and inference.
  flex       FlexAttention with a block mask, compiled with `torch.compile`. For ASSA both branches run in
             ONE kernel: the queries are stacked twice ([q; q]) against keys [k; k_compressed]; the first
             copy of each query may only see its neighbour window of k, the second copy only the
             compressed keys, so the two halves come out separately normalised, as the gate requires.
             Selected by "auto" only on CUDA (FlexAttention has no backward on CPU).

`auto` picks: the reference while exporting (torch.export / ONNX / TorchScript), "flex" for CUDA
tensors when FlexAttention and torch.compile are available, otherwise "strided".
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from .functional import assa_reference, bna_reference, check_bna_args, is_exporting

__all__ = [
    "blockwise_neighborhood_attention",
    "adaptive_sparse_attention",
    "available_backends",
    "select_backend",
    "bna_dispatch",
    "assa_dispatch",
    "bna_strided",
    "assa_strided",
    "bna_flex",
    "assa_flex",
]


def _check_gqa(q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects (batch, heads, tokens, head_dim) tensors, got q{tuple(q.shape)} k{tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]} key/value heads")
    return q.shape[1] != k.shape[1]


# ----------------------------------------------------------------------------------------------------
# strided: windows as unfold views, two SDPA calls, no (2r+1)x copies
# ----------------------------------------------------------------------------------------------------
def _bna_strided_pieces(q, k, v, num_blocks: int, radius: int):
    """The local branch in pieces that tile the token axis, straight from SDPA (no concatenation).

    Returns [(out, select)]: `out` is one SDPA result and `select(t)` the view of any (B, H, N, D) tensor
    `t` that holds the same queries in the same order, shaped like `out`. Callers either concatenate the
    pieces (`bna_strided`) or write a mix of them straight into one output (`assa_strided`).
    """
    gqa = _check_gqa(q, k, v)
    b, h, n, d = q.shape
    check_bna_args(n, num_blocks, radius)
    width = 2 * radius + 1
    if width == num_blocks:  # a single window holds every token: plain attention
        return [(F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa), lambda t: t)]
    hkv = k.shape[1]
    size = n // num_blocks
    window = width * size
    # Fold batch into the head axis so that the window index can become SDPA's batch axis. Query head
    # i = (batch, head) still reads kv head i // group under enable_gqa, because heads = group * kv_heads.
    q3, k3, v3 = q.reshape(b * h, n, d), k.reshape(b * hkv, n, d), v.reshape(b * hkv, n, d)

    # Border blocks: blocks 0..r all use window 0 and the last r+1 blocks the last window. Both groups
    # are one view with two entries: (2, b*h, (r+1)*size, d) against (2, b*hkv, window, d).
    edge = (radius + 1) * size
    last_start = (num_blocks - width) * size
    q_edge = q3.unfold(1, edge, n - edge).permute(1, 0, 3, 2)
    k_edge = k3.unfold(1, window, last_start).permute(1, 0, 3, 2)
    v_edge = v3.unfold(1, window, last_start).permute(1, 0, 3, 2)
    out_edge = F.scaled_dot_product_attention(q_edge, k_edge, v_edge, enable_gqa=gqa)
    pieces = [
        (out_edge[0].unflatten(0, (b, h)), lambda t: t[:, :, :edge]),
        (out_edge[1].unflatten(0, (b, h)), lambda t: t[:, :, n - edge :]),
    ]
    interior = num_blocks - 2 * (radius + 1)
    if interior:
        # Interior block j (r+1 <= j < nb-r-1) reads window j-r, i.e. tokens [(j-r)*size, (j+r+1)*size):
        # a sliding window of stride `size` over tokens [size, n - size).
        q_mid = q3[:, edge : n - edge].unflatten(1, (interior, size)).transpose(0, 1)
        k_mid = k3[:, size : n - size].unfold(1, window, size).permute(1, 0, 3, 2)
        v_mid = v3[:, size : n - size].unfold(1, window, size).permute(1, 0, 3, 2)
        out_mid = F.scaled_dot_product_attention(q_mid, k_mid, v_mid, enable_gqa=gqa)  # (interior, b*h, size, d)
        select_mid = lambda t: t[:, :, edge : n - edge].unflatten(2, (interior, size)).permute(2, 0, 1, 3, 4)
        pieces.insert(1, (out_mid.unflatten(1, (b, h)), select_mid))
    return pieces


def _token_major(pieces) -> list:
    """Each piece as (B, H, tokens, D), in token order (undoes the window-major layout of the middle)."""
    out = []
    for piece, _ in pieces:
        if piece.dim() == 5:  # (interior, b, h, size, d) -> (b, h, interior * size, d)
            piece = piece.permute(1, 2, 0, 3, 4).flatten(2, 3)
        out.append(piece)
    return out


def bna_strided(q, k, v, num_blocks: int, radius: int):
    """BNA without materialising neighbour copies: SDPA over `unfold` views of k and v."""
    pieces = _token_major(_bna_strided_pieces(q, k, v, num_blocks, radius))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


def assa_strided(q, k, v, k_compressed, v_compressed, gate, num_blocks: int, radius: int):
    """ASSA = lerp(local, global, gate) with the strided local branch and a GQA-native global branch.

    Without gradients the mix is written piece by piece straight into one output whose memory is
    (B, N, H, D) (returned as the (B, H, N, D) view): no concatenation of the local pieces, no copy of
    the middle piece back to token order, and the caller's transpose(1, 2).reshape(B, N, H * D) is a
    view. Same elementwise `lerp` on the same numbers, so the same result to the bit. With gradients the
    pieces are concatenated and mixed by one differentiable `lerp` (`out=` has no autograd).
    """
    gqa = _check_gqa(q, k_compressed, v_compressed)
    glob = F.scaled_dot_product_attention(q, k_compressed, v_compressed, enable_gqa=gqa)
    pieces = _bna_strided_pieces(q, k, v, num_blocks, radius)
    dtype = pieces[0][0].dtype
    tensors = (q, k, v, k_compressed, v_compressed, gate)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        local = torch.cat(_token_major(pieces), dim=2) if len(pieces) > 1 else pieces[0][0]
        return torch.lerp(local, glob, gate.to(dtype))  # gate*glob + (1-gate)*local, one fused op
    b, h, n, d = q.shape
    out = torch.empty((b, n, h, d), dtype=dtype, device=q.device).transpose(1, 2)
    gate = gate.to(dtype).expand(b, h, n, d)
    for local, select in pieces:
        torch.lerp(local, select(glob), select(gate), out=select(out))
    return out


# ----------------------------------------------------------------------------------------------------
# flex: FlexAttention + block mask (compiled; CUDA)
# ----------------------------------------------------------------------------------------------------
def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_fn(compiled: bool):
    if compiled:
        return _compiled_flex()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _bna_mask_mod(num_tokens: int, num_blocks: int, radius: int):
    size = num_tokens // num_blocks
    width = 2 * radius + 1

    def local(q_idx, kv_idx):
        q_block = (q_idx % num_tokens) // size
        start = torch.clamp(q_block - radius, 0, num_blocks - width)
        kv_block = kv_idx // size
        return (kv_idx < num_tokens) & (kv_block >= start) & (kv_block < start + width)

    return local


def _mask_block_size(*lengths: int) -> int:
    # FlexAttention tiles the mask in squares; 128 on GPU, smaller when the sequence is short.
    block = 128
    while block > 16 and any(n % block for n in lengths):
        block //= 2
    return block


@functools.lru_cache(maxsize=32)
def _bna_block_mask(num_tokens: int, num_blocks: int, radius: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    local = _bna_mask_mod(num_tokens, num_blocks, radius)
    mask_mod = lambda b, h, q_idx, kv_idx: local(q_idx, kv_idx)
    bs = _mask_block_size(num_tokens)
    return create_block_mask(mask_mod, None, None, num_tokens, num_tokens, device=device, BLOCK_SIZE=bs)


@functools.lru_cache(maxsize=32)
def _assa_block_mask(num_tokens: int, num_compressed: int, num_blocks: int, radius: int, device: str):
    """Mask over queries [q; q] (2N) and keys [k; k_c] (N + N_c): rows < N local, rows >= N global."""
    from torch.nn.attention.flex_attention import create_block_mask

    local = _bna_mask_mod(num_tokens, num_blocks, radius)

    def mask_mod(b, h, q_idx, kv_idx):
        return torch.where(q_idx < num_tokens, local(q_idx, kv_idx), kv_idx >= num_tokens)

    bs = _mask_block_size(num_tokens, num_compressed)
    return create_block_mask(
        mask_mod, None, None, 2 * num_tokens, num_tokens + num_compressed, device=device, BLOCK_SIZE=bs
    )


def bna_flex(q, k, v, num_blocks: int, radius: int, compiled: bool = True):
    gqa = _check_gqa(q, k, v)
    n = q.shape[2]
    check_bna_args(n, num_blocks, radius)
    mask = _bna_block_mask(n, num_blocks, radius, str(q.device))
    return _flex_fn(compiled)(q, k, v, block_mask=mask, enable_gqa=gqa)


def assa_flex(q, k, v, k_compressed, v_compressed, gate, num_blocks: int, radius: int, compiled: bool = True):
    gqa = _check_gqa(q, k, v)
    n = q.shape[2]
    check_bna_args(n, num_blocks, radius)
    nc = k_compressed.shape[2]
    mask = _assa_block_mask(n, nc, num_blocks, radius, str(q.device))
    out = _flex_fn(compiled)(
        torch.cat([q, q], dim=2),
        torch.cat([k, k_compressed], dim=2),
        torch.cat([v, v_compressed], dim=2),
        block_mask=mask,
        enable_gqa=gqa,
    )
    local, glob = out[:, :, :n], out[:, :, n:]
    return torch.lerp(local, glob, gate.to(local.dtype))


def _bna_flex_eager(q, k, v, num_blocks, radius):
    return bna_flex(q, k, v, num_blocks, radius, compiled=False)


def _assa_flex_eager(*args):
    return assa_flex(*args, compiled=False)


# ----------------------------------------------------------------------------------------------------
# registry and dispatch
# ----------------------------------------------------------------------------------------------------
# name -> (bna implementation, assa implementation). "flex_eager" runs FlexAttention uncompiled: slow,
# forward-only on CPU, but it checks the flex masks without a compile (used by the tests).
_BACKENDS = {
    "reference": (bna_reference, assa_reference),
    "strided": (bna_strided, assa_strided),
    "flex": (bna_flex, assa_flex),
    "flex_eager": (_bna_flex_eager, _assa_flex_eager),
}
_FLEX_FAILED = False


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def backend_choices() -> tuple[str, ...]:
    """Every name a layer's `backend` may take: "auto" and the registered ones ("reference" among them)."""
    return ("auto",) + available_backends()


def select_backend(q: torch.Tensor) -> str:
    """The backend "auto" uses for these inputs (exporting is handled by the caller)."""
    if q.is_cuda and not _FLEX_FAILED and flex_available():
        return "flex"
    return "strided"


def _resolve(backend: str, q) -> str:
    if backend == "auto":
        return select_backend(q)
    if backend not in _BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {backend_choices()}")
    if backend in ("flex", "flex_eager") and q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise ValueError(
            f"attention backend {backend!r} has no backward on CPU (FlexAttention limitation); use "
            "backend='strided' or 'auto' for CPU training"
        )
    return backend


def _call(backend: str, which: int, auto: bool, *args):
    global _FLEX_FAILED
    try:
        return _BACKENDS[backend][which](*args)
    except Exception as err:  # a compile failure on an unusual GPU/driver must not kill training
        if not (auto and backend == "flex"):
            raise
        _FLEX_FAILED = True
        warnings.warn(f"FlexAttention backend failed ({type(err).__name__}: {err}); falling back to 'strided'")
        return _BACKENDS["strided"][which](*args)


def bna_dispatch(q, k, v, num_blocks: int, radius: int, backend: str = "auto"):
    name = _resolve(backend, q)
    return _call(name, 0, backend == "auto", q, k, v, num_blocks, radius)


def assa_dispatch(q, k, v, k_compressed, v_compressed, gate, num_blocks: int, radius: int, backend: str = "auto"):
    name = _resolve(backend, q)
    return _call(name, 1, backend == "auto", q, k, v, k_compressed, v_compressed, gate, num_blocks, radius)


def blockwise_neighborhood_attention(q, k, v, num_blocks: int, radius: int, backend: str = "auto"):
    """Blockwise neighbourhood attention on (batch, heads, tokens, head_dim).

    The sequence is split into `num_blocks` equal blocks; block b attends to blocks b-r..b+r, the window
    shifted inward at the borders. `backend` is "reference" or one of `available_backends()`; "auto"
    takes the fastest one valid for the inputs, and while exporting every choice runs the reference.
    """
    if backend == "reference" or is_exporting():
        return bna_reference(q, k, v, num_blocks, radius)
    return bna_dispatch(q, k, v, num_blocks, radius, backend)


def adaptive_sparse_attention(
    q, k, v, k_compressed, v_compressed, gate, num_blocks: int, radius: int, backend: str = "auto"
):
    """ASSA on (batch, heads, tokens, head_dim): gate * global + (1 - gate) * local (see `assa_reference`).

    Same `backend` choices as `blockwise_neighborhood_attention`; the reference while exporting.
    """
    if backend == "reference" or is_exporting():
        return assa_reference(q, k, v, k_compressed, v_compressed, gate, num_blocks, radius)
    return assa_dispatch(q, k, v, k_compressed, v_compressed, gate, num_blocks, radius, backend)
