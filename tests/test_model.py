"""PocketDiT: forward/backward at several sizes, size errors, save/load, presets, text inputs."""

import pytest
import torch

from pocketdit import InvalidResolutionError, PocketDiT


def randomize(model, seed=0):
    """Give every parameter non-trivial values (a fresh model has zero-initialised output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def inputs(b=2, c=4, h=16, w=16, text_len=5, text_dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g), torch.rand(b, generator=g), torch.randn(b, text_len, text_dim, generator=g)


@pytest.fixture(scope="module")
def nano():
    return randomize(PocketDiT.from_preset("nano")).eval()


@pytest.mark.parametrize("h,w", [(16, 16), (16, 32), (32, 16), (8, 24)])
def test_forward_backward_square_and_non_square(h, w):
    model = randomize(PocketDiT.from_preset("nano"))
    x, t, ctx = inputs(h=h, w=w)
    out = model(x, t, ctx).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert model.patch_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("h,w,blocks", [(18, 16, 4), (16, 6, 4), (2, 2, 4), (12, 12, 8), (12, 20, 16)])
def test_bad_sizes_raise_named_error_with_valid_sizes(h, w, blocks):
    nano = PocketDiT.from_preset("nano", num_blocks=blocks).eval()
    x, t, ctx = inputs(h=h, w=w)
    with pytest.raises(InvalidResolutionError, match="Nearest valid latent sizes: ") as err:
        nano(x, t, ctx)
    suggested = str(err.value).split("Nearest valid latent sizes: ")[1].split(", ")
    for s in suggested:
        sh, sw = map(int, s.split("x"))
        assert nano.is_valid_latent_size(sh, sw)
        x, t, ctx = inputs(h=sh, w=sw)
        assert nano(x, t, ctx).sample.shape[-2:] == (sh, sw)


def test_dense_attention_accepts_sizes_that_blocks_do_not():
    # 12x12 latent -> 6x6 = 36 tokens, not divisible by 8 blocks; fine when no layer uses blocks.
    assert not PocketDiT.from_preset("nano", num_blocks=8).is_valid_latent_size(12, 12)
    model = PocketDiT.from_preset("nano", num_blocks=8, attention_types="dense")
    x, t, ctx = inputs(h=12, w=12)
    assert model(x, t, ctx).sample.shape == x.shape


def test_save_pretrained_from_pretrained_is_bit_exact(nano, tmp_path):
    nano.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = PocketDiT.from_pretrained(tmp_path).eval()
    x, t, ctx = inputs()
    with torch.no_grad():
        assert torch.equal(nano(x, t, ctx).sample, loaded(x, t, ctx).sample)
    assert loaded.config.attention_types == nano.config.attention_types


def test_outputs_depend_on_time_and_text(nano):
    x, t, ctx = inputs()
    with torch.no_grad():
        base = nano(x, t, ctx).sample
        assert not torch.allclose(base, nano(x, 1 - t, ctx).sample)
        assert not torch.allclose(base, nano(x, t, ctx + 1).sample)


def test_text_mask_hides_padding_tokens(nano):
    x, t, ctx = inputs(text_len=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 2, dtype=torch.bool)
    garbage = ctx.clone()
    garbage[:, 3:] = 100.0
    with torch.no_grad():
        a = nano(x, t, ctx, mask).sample
        b = nano(x, t, garbage, mask).sample
    torch.testing.assert_close(a, b)


def test_all_text_masked_is_finite_and_equals_empty_prompt(nano):
    x, t, ctx = inputs()
    none = torch.zeros(2, 5, dtype=torch.bool)
    with torch.no_grad():
        out = nano(x, t, ctx, none).sample
        other = nano(x, t, torch.randn_like(ctx), none).sample
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, other)


def test_two_text_encoders_concatenate_and_validate_widths():
    model = randomize(PocketDiT.from_preset("nano", text_embed_dims=(32, 48)))
    x, t, _ = inputs()
    states = [torch.randn(2, 5, 32), torch.randn(2, 7, 48)]
    masks = [torch.ones(2, 5, dtype=torch.bool), torch.zeros(2, 7, dtype=torch.bool)]
    out = model(x, t, states, masks).sample
    assert out.shape == x.shape
    with torch.no_grad():  # the second encoder is fully dropped, so its content must not matter
        torch.testing.assert_close(model(x, t, [states[0], states[1] * 5], masks).sample, out)
    with pytest.raises(ValueError, match=r"widths \[32, 48\]"):
        model(x, t, torch.randn(2, 5, 32))


@pytest.mark.parametrize("kind", ["dense", "global", "local", ["assa", "dense"]])
def test_attention_types_are_one_flag(kind):
    model = PocketDiT.from_preset("nano", attention_types=kind)
    kinds = [b.attn.kind for b in (*model.down_blocks, *model.up_blocks)]
    assert kinds == ([kind] * 2 if isinstance(kind, str) else kind)
    assert all(b.attn.kind == "dense" for b in model.mid_blocks)
    x, t, ctx = inputs()
    assert model(x, t, ctx).sample.shape == x.shape


def test_bad_config_values_are_errors():
    with pytest.raises(ValueError, match="unknown attention type"):
        PocketDiT.from_preset("nano", attention_types="sparse")
    with pytest.raises(ValueError, match="one per Down and Up layer"):
        PocketDiT.from_preset("nano", attention_types=["assa"])
    with pytest.raises(ValueError, match="unknown PocketDiT config key"):
        PocketDiT.from_preset("nano", hidden=3)
    with pytest.raises(ValueError, match="unknown PocketDiT preset"):
        PocketDiT.from_preset("huge")


def test_gradient_checkpointing_gives_same_loss_and_grads():
    torch.manual_seed(0)
    model = randomize(PocketDiT.from_preset("nano"))
    x, t, ctx = inputs()
    model(x, t, ctx).sample.square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.enable_gradient_checkpointing()
    model(x, t, ctx).sample.square().mean().backward()
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


def test_set_attention_backend_reaches_every_sparse_layer_and_keeps_the_output():
    torch.manual_seed(0)
    model = randomize(PocketDiT.from_preset("nano"))
    x, t, ctx = inputs()
    with torch.no_grad():
        auto = model(x, t, ctx).sample
        model.set_attention_backend("reference")
        layers = [m for m in model.modules() if hasattr(m, "backend")]
        assert layers and all(m.backend == "reference" for m in layers)
        torch.testing.assert_close(model(x, t, ctx).sample, auto, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        model.set_attention_backend("fast")


def test_features_are_the_last_up_tokens(nano):
    x, t, ctx = inputs()
    with torch.no_grad():
        out = nano(x, t, ctx, output_features=True)
    assert out.features.shape == (2, 8 * 8, nano.config.hidden_size)
    assert nano(x, t, ctx).features is None


def test_small_preset_structure():
    with torch.device("meta"):
        model = PocketDiT.from_preset("small")
    assert len(model.skip_projections) == 4
    assert [len(model.down_blocks), len(model.mid_blocks), len(model.up_blocks)] == [6, 8, 10]
    assert [b.ff.fc1.out_features // 1024 for b in model.blocks()] == [4] * 6 + [3] * 8 + [4] * 10
    assert model.down_blocks[0].attn.num_kv_heads == 8


@pytest.mark.parametrize("name,target", [("tiny", 0.3e9), ("small", 0.4e9), ("full", 1.6e9)])
def test_preset_parameter_counts_within_15_percent_of_paper(name, target):
    with torch.device("meta"):
        model = PocketDiT.from_preset(name)
    n = sum(p.numel() for p in model.parameters())
    assert 0.85 * target <= n <= 1.15 * target, f"{name}: {n / 1e6:.1f}M"


@pytest.mark.parametrize("depth_mid", [2, 3, 4])
def test_every_long_skip_joins_two_different_activations(depth_mid):
    """Each skip projection sees [later activation, earlier activation]; were both halves the same tensor,
    swapping the two halves of its weight would change nothing."""
    torch.manual_seed(0)
    model = PocketDiT.from_preset("nano", depth_mid=depth_mid).eval()
    for blk in model.blocks():  # non-zero outputs, so every activation differs from its block's input
        torch.nn.init.normal_(blk.cross_attn.to_out.weight, std=0.1)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = model(x, t, ctx).sample
        for proj in model.skip_projections:
            d = proj.in_features // 2
            w = proj.weight.clone()
            proj.weight.copy_(torch.cat([w[:, d:], w[:, :d]], dim=1))
            moved = model(x, t, ctx).sample
            proj.weight.copy_(w)
            assert (moved - ref).abs().max() > 1e-4


def test_nearest_valid_sizes_are_found_for_a_size_off_the_grid():
    model = PocketDiT.from_preset("nano")
    m = model.latent_multiple
    for side in (3 * m + 1, 12 * m + 4, 25 * m - 1):  # not multiples of m, small to large
        near = model.valid_latent_sizes_near(side, side)
        assert len(near) == 4 and all(model.is_valid_latent_size(h, w) for h, w in near)
        assert all(abs(h - side) <= 2 * m and abs(w - side) <= 2 * m for h, w in near), (side, near)


def test_text_refiner_starts_as_identity_and_learns_token_mixing():
    """A refiner added to a model changes nothing until trained (zero output projections), and once its weights
    move it mixes the text tokens: a token's refined state depends on the other tokens, padding excluded."""
    plain = randomize(PocketDiT.from_preset("nano"), seed=1)
    refined = PocketDiT.from_preset("nano", text_refiner_depth=2)
    missing = refined.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("text_refiner.") for k in missing)
    x, t, ctx = inputs(text_len=6)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    with torch.no_grad():
        assert torch.equal(plain(x, t, ctx, mask).sample, refined(x, t, ctx, mask).sample)
        randomize(refined.text_refiner, seed=2)
        c1, _ = refined.encode_text(ctx, mask)
        ctx2 = ctx.clone()
        ctx2[:, 0] += 1.0  # change token 0 only
        c2, _ = refined.encode_text(ctx2, mask)
        assert (c2[:, 1] - c1[:, 1]).abs().max() > 1e-4  # token 1 now sees token 0
        ctx3 = ctx.clone()
        ctx3[1, 4:] = 100.0  # padding of sample 1 must not matter
        c3, _ = refined.encode_text(ctx3, mask)
        torch.testing.assert_close(c3[1, :4], c1[1, :4])
    out = refined(x, t, ctx, mask).sample
    out.square().mean().backward()
    assert all(p.grad is not None for p in refined.text_refiner.parameters())
