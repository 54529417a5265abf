"""Width-elastic PocketDiT (pocketdit.elastic): slicing, grouped layouts, private tables, extraction, export."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pocketdit import elastic
from pocketdit.model import PRESETS, PocketDiT

WIDTHS = (0.5, 0.75, 1.0)


def _supernet(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = PocketDiT.preset_config(
        "nano", hidden_size=128, num_heads=8, num_kv_heads=4, depth_mid=4, elastic_widths=list(WIDTHS), **overrides
    )
    model = PocketDiT(**cfg).eval()
    with torch.no_grad():  # zero-initialised layers (output, gates, cross-attention out) would hide slicing errors
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(b=2, size=16):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, 4, size, size, generator=g), torch.rand(b, generator=g), torch.randn(b, 5, 32, generator=g),
            torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))


@pytest.mark.parametrize("width", WIDTHS)
def test_extracted_width_equals_the_supernet_and_has_its_own_parameter_count(width):
    model = _supernet()
    args = _inputs()
    with torch.no_grad(), model.at_width(width):
        want = model(*args).sample
    sub = model.extract_width(width).eval()
    with torch.no_grad():
        got = sub(*args).sample
    assert sub.elastic_widths is None and sub.config.hidden_size == int(128 * width)
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    standalone = PocketDiT(**elastic.sub_config(model.config, width))
    assert sub.num_parameters() == standalone.num_parameters()
    assert {k: v.shape for k, v in sub.state_dict().items()} == {k: v.shape for k, v in standalone.state_dict().items()}
    assert model.width == 1.0  # at_width restored it


@pytest.mark.parametrize("width", [0.5, 0.75])
def test_a_width_costs_the_flops_of_its_standalone_model(width):
    """Slicing, not masking: the supernet at a width runs exactly its standalone model's FLOPs."""
    model = _supernet()
    sub = model.extract_width(width).eval()
    args = _inputs()

    def flops(m):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(*args)
        return counter.get_total_flops()

    with model.at_width(width):
        sliced = flops(model)
    assert sliced == flops(sub)
    assert sliced < 0.75 * flops(model)


def _pad_groups(x, groups, d_full):
    """x (..., groups * d') -> (..., groups * d_full), each group zero-padded at its end."""
    parts = x.unflatten(-1, (groups, -1))
    return F.pad(parts, (0, d_full - parts.shape[-1])).flatten(-2)


def _groups_prefix(y, groups, keep):
    return y.unflatten(-1, (groups, -1))[..., :keep].flatten(-2)


@pytest.mark.parametrize("path,in_groups,out_groups", [
    ("t_block.1", 1, 6),                 # Linear(d -> 6d): six d-wide modulation vectors
    ("merge.proj", 4, 1),                # TokenMerge: input is a 2x2 window of d-wide tokens
    ("split.proj", 1, 4),                # TokenSplit: output is a 2x2 window of d-wide tokens
    ("skip_projections.0", 2, 1),        # U-ViT skip over cat([x, skip])
    ("skip_projections.1", 2, 1),
])
def test_grouped_layouts_slice_each_group(path, in_groups, out_groups):
    """A width's layer equals the full layer on the zero-padded input, read at each group's first d' outputs;
    a plain [:d'] prefix slice of these layers fails this."""
    model = _supernet()
    layer = model.get_submodule(path)
    d, dw = 128, 64
    x = torch.randn(3, in_groups * dw)
    with torch.no_grad():
        full = layer(_pad_groups(x, in_groups, d))
        with model.at_width(0.5):
            sliced = layer(x)
        prefix = F.linear(x, layer.weight[: out_groups * dw, : in_groups * dw], layer.bias[: out_groups * dw])
    torch.testing.assert_close(sliced, _groups_prefix(full, out_groups, dw))
    assert not torch.allclose(prefix, _groups_prefix(full, out_groups, dw), atol=1e-4)


def test_attention_keeps_whole_kv_groups_and_cross_attention_keeps_its_text_side():
    model = _supernet(cross_attention_dim=80)
    blk = model.down_blocks[0]
    with model.at_width(0.5):
        wq, _ = blk.attn.to_q.active_params()
        wk, _ = blk.attn.to_k.active_params()
        wg, _ = blk.attn.gate.active_params()
        cq, _ = blk.cross_attn.to_q.active_params()
        co, _ = blk.cross_attn.to_out.active_params()
    assert wq.shape == (4 * 16, 64) and wk.shape == (2 * 16, 64) and wg.shape == (4, 64)  # 4 of 8 heads, 2 of 4 KV
    assert cq.shape == (80, 64) and co.shape == (64, 80)  # fixed cross-attention inner width (cross_attention_dim)
    assert type(blk.cross_attn.to_k) is torch.nn.Linear  # reads the text: never sliced
    sub = model.extract_width(0.5)
    assert sub.down_blocks[0].attn.num_heads == 4 and sub.down_blocks[0].attn.num_kv_heads == 2
    assert sub.config.head_dim == model.config.head_dim


def test_width_tied_parameters_are_private_to_each_width():
    model = _supernet()
    args = _inputs()
    names = [n for n, _ in model.named_parameters()]
    assert "down_blocks.0.scale_shift_tables.0_5" in names and "final_layer.scale_shift_tables.0_75" in names
    assert "down_blocks.0.norm_cross.width_weight.0_5" in names
    with torch.no_grad():
        full_before = model(*args).sample
        with model.at_width(0.5):
            half_before = model(*args).sample
        # changing the 0.5 tables moves width 0.5 only; changing the full tables moves the full width only
        for blk in model.blocks():
            blk.scale_shift_tables["0_5"].add_(0.5)
            blk.norm_cross.width_weight["0_5"].mul_(2)
        assert torch.equal(model(*args).sample, full_before)
        with model.at_width(0.5):
            half_after = model(*args).sample
        assert not torch.allclose(half_after, half_before)
        for blk in model.blocks():
            blk.scale_shift_table.add_(0.5)
        assert not torch.allclose(model(*args).sample, full_before)
        with model.at_width(0.5):
            assert torch.equal(model(*args).sample, half_after)


def test_private_tables_start_as_the_slice_of_the_full_ones():
    torch.manual_seed(0)
    model = PocketDiT.from_preset("nano", hidden_size=128, num_heads=8, num_kv_heads=4, elastic_widths=list(WIDTHS))
    blk = model.down_blocks[0]
    torch.testing.assert_close(blk.scale_shift_tables["0_75"], blk.scale_shift_table[:, :96])
    torch.testing.assert_close(model.final_layer.scale_shift_tables["0_5"], model.final_layer.scale_shift_table[:, :64])


def _config(preset):
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(PocketDiT.__init__).parameters.items() if k != "self"}
    return {**defaults, **PocketDiT.preset_config(preset)}


def test_paper_presets_are_widths_of_the_full_supernet():
    """small and tiny are the full supernet's 0.5 and 0.375 widths (heads scale with width, KV groups of 2)."""
    full = _config("full")
    for width, name in ((0.5, "small"), (0.375, "tiny")):
        cut = elastic.sub_config({**full, "elastic_widths": [0.375, 0.5, 1.0]}, width)
        assert cut == {**_config(name), "elastic_widths": None}
    assert elastic.check_widths(full, [1.0, 0.5, 0.375]) == (0.375, 0.5, 1.0)
    assert set(PRESETS) >= {"full", "small", "tiny"}


@pytest.mark.parametrize("widths,match", [
    ([0.375, 1.0], "1.5 KV heads"),        # 128 * 0.375 = 48 -> 3 heads, 1.5 KV heads
    ([0.5], "must include 1.0"),
    ([0.0, 1.0], r"in \(0, 1\]"),
    ([1.5, 1.0], r"in \(0, 1\]"),
])
def test_widths_are_validated_when_the_model_is_built(widths, match):
    with pytest.raises(ValueError, match=match):
        PocketDiT.from_preset("nano", hidden_size=128, num_heads=8, num_kv_heads=4, elastic_widths=widths)


def test_an_unlisted_width_names_the_listed_ones_and_a_plain_model_has_one_width():
    model = _supernet()
    with pytest.raises(ValueError, match="0.5, 0.75, 1"):
        model.set_width(0.25)
    with pytest.raises(ValueError, match="0.5, 0.75, 1"):
        model.extract_width(0.6)
    assert model.width == 1.0
    plain = PocketDiT.from_preset("nano")
    with pytest.raises(ValueError, match="not an elastic supernet"):
        plain.set_width(0.5)


def test_full_width_is_the_plain_model_and_save_load_keeps_the_widths(tmp_path):
    model = _supernet()
    args = _inputs()
    plain = model.extract_width(1.0).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(*args).sample, model(*args).sample, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    loaded = PocketDiT.from_pretrained(tmp_path).eval()
    assert loaded.elastic_widths == WIDTHS
    with torch.no_grad(), model.at_width(0.75), loaded.at_width(0.75):
        torch.testing.assert_close(loaded(*args).sample, model(*args).sample, rtol=0, atol=0)


def test_a_chosen_width_exports_as_a_static_graph():
    model = _supernet()
    args = _inputs()
    model.set_width(0.5)
    program = torch.export.export(model, args, strict=False)
    with torch.no_grad():
        want = model(*args).sample
        got = program.module()(*args)
    got = got.sample if hasattr(got, "sample") else got[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    shapes = {tuple(n.meta["val"].shape) for n in program.graph.nodes if "val" in n.meta and hasattr(n.meta["val"], "shape")}
    assert (2, 64, 256) in shapes and (2, 64, 512) not in shapes  # Down-stage FFN hidden: 0.5 x 128 x 4, not 128 x 4


def test_gradients_reach_only_the_active_widths_parameters():
    model = _supernet().train()
    args = _inputs()
    with model.at_width(0.5):
        model(*args).sample.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["down_blocks.0.scale_shift_tables.0_5"] is not None
    assert grads["down_blocks.0.scale_shift_tables.0_75"] is None and grads["down_blocks.0.scale_shift_table"] is None
    w = grads["down_blocks.0.ff.fc1.weight"]
    assert w[: int(round(64 * 4.0)), :64].abs().sum() > 0 and w[256:].abs().sum() == 0 and w[:, 64:].abs().sum() == 0
    assert grads["down_blocks.0.cross_attn.to_k.weight"].abs().sum() > 0  # shared by every width


def test_cached_slices_follow_parameter_updates():
    """Without gradients a width keeps its contiguous slices; an in-place update or a load invalidates them."""
    model = _supernet()
    args = _inputs()
    with torch.no_grad(), model.at_width(0.5):
        first = model(*args).sample
        assert torch.equal(model(*args).sample, first)
        model.mid_blocks[0].ff.fc1.weight.mul_(1.5)  # an optimizer step or load_state_dict is in place too
        changed = model(*args).sample
        model.load_state_dict(_supernet(seed=1).state_dict())
        reloaded = model(*args).sample
    assert not torch.allclose(changed, first)
    fresh = _supernet(seed=1)
    with torch.no_grad(), fresh.at_width(0.5):
        torch.testing.assert_close(reloaded, fresh(*args).sample, rtol=0, atol=0)
