"""Every fast attention backend equals the reference (forward and backward), and dispatch picks them right."""

import pytest
import torch

from pocketdit import PocketDiT
from pocketdit.attention import KVCompression, SelfAttention, rope_2d
from pocketdit.attention import backends
from pocketdit.attention.backends import adaptive_sparse_attention, blockwise_neighborhood_attention
from pocketdit.attention.functional import assa_reference, bna_reference

TOL = 1e-4  # the accuracy target: relative error against the fp32 reference


def rel_err(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


def make(b=2, h=4, hkv=2, n=64, d=16, nc=None, seed=0, grad=False, model_layout=False):
    g = torch.Generator().manual_seed(seed)

    def t(heads, tokens):
        if model_layout:  # as SelfAttention produces them: (B, N, H, D) memory viewed as (B, H, N, D)
            return torch.randn(b, tokens, heads, d, generator=g).transpose(1, 2)
        return torch.randn(b, heads, tokens, d, generator=g)

    q, k, v = t(h, n), t(hkv, n), t(hkv, n)
    nc = nc or n // 4
    kc, vc = t(hkv, nc), t(hkv, nc)
    gate = torch.rand(b, h, n, 1, generator=g)
    tensors = [q, k, v, kc, vc, gate]
    return [x.detach().requires_grad_(grad) for x in tensors]


BNA_CASES = [
    # (tokens, blocks, radius): interior + borders, no interior (nb = 2r+2), single window (nb = 2r+1),
    # radius 0 and 2, the model's 16 blocks
    (64, 4, 1),
    (64, 8, 1),
    (96, 6, 2),
    (256, 16, 1),
    (48, 3, 1),
    (60, 5, 0),
    (80, 10, 2),
]


@pytest.mark.parametrize("tokens,blocks,radius", BNA_CASES)
@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_strided_bna_equals_reference(tokens, blocks, radius, hkv):
    q, k, v, *_ = make(n=tokens, hkv=hkv)
    ref = bna_reference(q, k, v, blocks, radius)
    out = backends.bna_strided(q, k, v, blocks, radius)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < TOL


def test_strided_bna_handles_model_memory_layout():
    q, k, v, *_ = make(n=128, model_layout=True)
    assert not q.is_contiguous()
    ref = bna_reference(q, k, v, 8, 1)
    assert rel_err(backends.bna_strided(q, k, v, 8, 1), ref) < TOL


@pytest.mark.parametrize("tokens,blocks,radius", [(64, 4, 1), (128, 8, 1), (96, 6, 2), (48, 3, 1)])
def test_strided_bna_gradients_equal_reference(tokens, blocks, radius):
    q, k, v, *_ = make(n=tokens, grad=True)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    (bna_reference(q, k, v, blocks, radius) * w).sum().backward()
    ref = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    (backends.bna_strided(q, k, v, blocks, radius) * w).sum().backward()
    for t, g in zip((q, k, v), ref):
        assert g.abs().sum() > 0
        assert rel_err(t.grad, g) < TOL


def test_strided_assa_equals_reference_forward_and_backward():
    args = make(n=256, hkv=2, grad=True)
    w = torch.randn(args[0].shape, generator=torch.Generator().manual_seed(2))
    ref_out = assa_reference(*args, 16, 1)
    (ref_out * w).sum().backward()
    ref_grads = [t.grad.clone() for t in args]
    for t in args:
        t.grad = None
    out = backends.assa_strided(*args, 16, 1)
    (out * w).sum().backward()
    assert rel_err(out, ref_out) < TOL
    for t, g in zip(args, ref_grads):  # q, k, v, compressed k/v and the gate all get matching gradients
        assert g.abs().sum() > 0
        assert rel_err(t.grad, g) < TOL


@pytest.mark.parametrize("tokens,blocks,radius", BNA_CASES)
@pytest.mark.parametrize("hkv", [4, 1])
@pytest.mark.parametrize("model_layout", [False, True])
def test_strided_assa_inference_path_equals_reference(tokens, blocks, radius, hkv, model_layout):
    # Without gradients assa_strided writes the gate mix piece by piece into a (B, N, H, D)-memory output;
    # with gradients it concatenates and mixes once. Both must equal the reference, and each other exactly
    # (the same lerp on the same numbers), for every block layout (interior blocks or not, one window).
    args = make(n=tokens, hkv=hkv, nc=tokens // 4, model_layout=model_layout)
    ref = assa_reference(*args, blocks, radius)
    with torch.no_grad():
        fast = backends.assa_strided(*args, blocks, radius)
    assert fast.shape == ref.shape
    assert fast.transpose(1, 2).is_contiguous()  # the layer's transpose(1, 2).reshape(B, N, H*D) is a view
    assert rel_err(fast, ref) < TOL
    graded = backends.assa_strided(*[t.detach().requires_grad_(True) for t in args], blocks, radius)
    assert graded.requires_grad
    assert torch.equal(fast, graded.detach())


def test_strided_assa_inference_path_broadcasts_the_gate():
    # A gate of any shape that broadcasts against (B, H, N, D): per head only, and a plain scalar tensor.
    q, k, v, kc, vc, _ = make(n=64)
    for gate in (torch.rand(1, 4, 1, 1, generator=torch.Generator().manual_seed(7)), torch.tensor(0.3)):
        with torch.no_grad():
            out = backends.assa_strided(q, k, v, kc, vc, gate, 4, 1)
        assert rel_err(out, assa_reference(q, k, v, kc, vc, gate, 4, 1)) < TOL


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("tokens,blocks,radius", [(64, 4, 1), (128, 8, 1), (96, 6, 2)])
def test_flex_masks_equal_reference(tokens, blocks, radius):
    # Uncompiled FlexAttention (forward only on CPU) checks the block masks the compiled GPU path uses.
    q, k, v, kc, vc, gate = make(n=tokens, nc=tokens // 4)
    with torch.no_grad():
        assert rel_err(backends.bna_flex(q, k, v, blocks, radius, compiled=False), bna_reference(q, k, v, blocks, radius)) < TOL
        fused = backends.assa_flex(q, k, v, kc, vc, gate, blocks, radius, compiled=False)
        assert rel_err(fused, assa_reference(q, k, v, kc, vc, gate, blocks, radius)) < TOL


def test_flex_refuses_cpu_training_with_a_clear_error():
    q, k, v, *_ = make(n=64, grad=True)
    with pytest.raises(ValueError, match="no backward on CPU"):
        blockwise_neighborhood_attention(q, k, v, 4, 1, backend="flex")


def test_dispatch_auto_uses_strided_on_cpu_and_rejects_unknown_names():
    q, k, v, kc, vc, gate = make(n=64)
    assert backends.select_backend(q) == "strided"
    assert "strided" in backends.available_backends() and "flex" in backends.available_backends()
    torch.testing.assert_close(
        adaptive_sparse_attention(q, k, v, kc, vc, gate, 4, 1), backends.assa_strided(q, k, v, kc, vc, gate, 4, 1)
    )
    with pytest.raises(ValueError, match="unknown attention backend 'fast'.*strided"):
        blockwise_neighborhood_attention(q, k, v, 4, 1, backend="fast")
    with pytest.raises(ValueError, match="multiple of 4 equal blocks|cannot be split"):
        backends.bna_strided(q[:, :, :62], k[:, :, :62], v[:, :, :62], 4, 1)


def assa_layer(seed=0):
    torch.manual_seed(seed)
    layer = SelfAttention(64, num_heads=4, num_kv_heads=2, head_dim=16, kind="assa", num_blocks=4, block_radius=1)
    with torch.no_grad():  # a non-trivial gate and compression, so both branches and their mix matter
        layer.gate.weight.normal_(0, 0.5)
        layer.compress_k.conv.weight.normal_(0.25, 0.1)
    return layer


def test_assa_layer_auto_equals_reference_with_gradients():
    layer = assa_layer()
    x = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(3))
    rope = rope_2d(8, 8, 16)
    outs, grads = [], []
    for backend in ("reference", "auto"):
        layer.backend = backend
        layer.zero_grad()
        out = layer(x, rope, 8, 8)
        out.square().mean().backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
    assert rel_err(outs[1], outs[0]) < TOL
    # Relative to the largest gradient: some are exactly zero in theory (a key bias shifts every score of
    # a row equally), so their own relative error is rounding noise over rounding noise.
    scale = max(g.abs().max() for g in grads[0].values())
    for name, g in grads[0].items():
        assert ((grads[1][name] - g).abs().max() / scale).item() < TOL, name
    assert grads[0]["gate.weight"].abs().sum() > 0 and grads[0]["compress_v.conv.weight"].abs().sum() > 0


def test_model_forward_is_backend_independent():
    model = PocketDiT.from_preset("nano").eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # the zero-initialised output layer and gates would make every path output 0
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    x, t, text = torch.randn(1, 4, 16, 16, generator=g), torch.rand(1, generator=g), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad():
        auto = model(x, t, text).sample
        for m in model.modules():
            if isinstance(m, SelfAttention):
                m.backend = "reference"
        ref = model(x, t, text).sample
    assert rel_err(auto, ref) < TOL


def test_export_traces_the_reference_path():
    layer = assa_layer().eval()
    x = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(5))
    cos, sin = rope_2d(8, 8, 16)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, cos, sin):
            return self.layer(x, (cos, sin), 8, 8)

    program = torch.export.export(Wrapped(), (x, cos, sin))
    ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("unfold" in op or "flex" in op for op in ops), ops  # no fast-path ops in the graph
    assert any("index" in op for op in ops), ops  # the reference's neighbour gather
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, cos, sin), layer(x, (cos, sin), 8, 8), atol=1e-5, rtol=1e-4)


def test_kv_compression_equals_its_depthwise_conv():
    # KVCompression computes its conv as a weighted 2x2 sum in the attention layout; check it against
    # the Conv2d it holds, with trained-looking weights and bias, forward and backward.
    heads, d, height, width = 3, 8, 6, 10
    comp = KVCompression(heads * d)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        comp.conv.weight.copy_(torch.randn(comp.conv.weight.shape, generator=g))
        comp.conv.bias.copy_(torch.randn(comp.conv.bias.shape, generator=g))
    x = torch.randn(2, height * width, heads, d, generator=g).transpose(1, 2).requires_grad_(True)
    grid = x.permute(0, 1, 3, 2).reshape(2, heads * d, height, width)
    expected = comp.conv(grid).reshape(2, heads, d, -1).permute(0, 1, 3, 2)
    out = comp(x, height, width)
    assert out.shape == (2, heads, height * width // 4, d)
    assert rel_err(out, expected) < TOL
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), [x, comp.conv.weight, comp.conv.bias])
    ref = torch.autograd.grad((expected * w).sum(), [x, comp.conv.weight, comp.conv.bias])
    for a, b in zip(grads, ref):
        assert rel_err(a, b) < TOL
    with pytest.raises(ValueError, match="even height x width"):
        comp(x, height + 1, width)
