"""Palettization (LUT k-means, sensitivity-chosen 8-bit layers, self-distillation, compact storage) and the
torchao CPU schemes, on the nano preset."""

import copy
import json

import pytest
import torch

from pocketdit import quantize as Q
from pocketdit.model import PocketDiT


def nano(seed=0):
    torch.manual_seed(seed)
    model = PocketDiT.from_preset("nano").eval()
    with torch.no_grad():  # zero-initialised layers (final layer, cross-attn out) would make the test trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def model():
    return nano()


@pytest.fixture(scope="module")
def calibration(model):
    return Q.random_calibration(model, num_batches=2, batch_size=2)


@pytest.fixture(scope="module")
def palettized(model, calibration):
    q = copy.deepcopy(model)
    # nearest rounding: the fine-tuning tests below need an error to fine-tune away (GPTQ is tested on its own)
    config = Q.PalettizeConfig(nbits=4, high_nbits=8, target_avg_bits=4.3, assignment="nearest")
    report = Q.quantize_(q, config, calibration=calibration, progress=False)
    return q, report


def outputs(model, batches):
    with torch.no_grad():
        return [model(**b).sample for b in batches]


# ----------------------------------------------------------------------------------------------------
def test_palettize_weight_has_at_most_2_pow_n_values_and_dequantizes_exactly():
    torch.manual_seed(0)
    w = torch.randn(48, 40)
    pw = Q.palettize_weight(w, nbits=3)
    assert pw.lut.shape == (1, 8)
    assert int(pw.indices.max()) < 8
    deq = pw.dequantize()
    assert deq.shape == w.shape
    assert deq.unique().numel() <= 8
    # k-means with 8 levels beats uniform 8-level rounding of the same range
    levels = torch.linspace(w.min(), w.max(), 8)
    uniform = levels[(w[..., None] - levels).abs().argmin(-1)]
    assert (deq - w).pow(2).mean() < (uniform - w).pow(2).mean()
    # LUT is stored in fp16: values survive a round trip through half precision unchanged
    assert torch.equal(pw.lut, pw.lut.half().float())


def test_tiny_weights_are_their_own_palette():
    w = torch.randn(2, 3)
    pw = Q.palettize_weight(w, nbits=4)
    assert torch.equal(pw.dequantize(), w.half().float())


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
def test_pack_unpack_roundtrip(nbits):
    g = torch.Generator().manual_seed(nbits)
    idx = torch.randint(0, 2**nbits, (7, 13), generator=g).to(torch.uint8)
    packed = Q.pack_indices(idx, nbits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (idx.numel() * nbits + 7) // 8
    assert torch.equal(Q.unpack_indices(packed, nbits, idx.shape), idx)


def test_choose_layer_bits_respects_budget_and_promotes_most_sensitive():
    numels = {"a": 100, "b": 100, "c": 800}
    sens = {"a": 5.0, "b": 1.0, "c": 10.0}
    bits = Q.choose_layer_bits(sens, numels, 4, 8, 4.5)
    # c is most sensitive but promoting it costs 3200 extra bits > budget 500; a fits (400), then b does not
    assert bits == {"a": 8, "b": 4, "c": 4}
    avg = sum(bits[n] * numels[n] for n in numels) / sum(numels.values())
    assert avg <= 4.5


def test_choose_layer_bits_per_bit_prefers_error_per_weight():
    numels = {"big": 400, "s1": 100, "s2": 100, "rest": 1400}
    sens = {"big": 4.0, "s1": 3.0, "s2": 2.0, "rest": 0.1}
    # budget 0.8 * 2000 = 1600 extra bits: by sensitivity, "big" comes first and takes all of it (1600);
    # per bit (s1 0.03, s2 0.02, big 0.01 per weight), s1 and s2 come first (800) and big no longer fits
    assert Q.choose_layer_bits(sens, numels, 4, 8, 4.8) == {"big": 8, "rest": 4, "s1": 4, "s2": 4}
    assert Q.choose_layer_bits(sens, numels, 4, 8, 4.8, per_bit=True) == {"big": 4, "rest": 4, "s1": 8, "s2": 8}


def test_model_output_sensitivity_is_the_error_of_quantizing_that_layer_alone(model, calibration):
    q = copy.deepcopy(model)
    layers = Q.palettizable_layers(q)
    names = ["patch_embed", "final_layer.linear", "down_blocks.0.ff.fc1"]
    palettes = {n: Q.palettize_weight(layers[n].weight, 2) for n in names}
    before = {n: p.clone() for n, p in q.state_dict().items()}
    sens = Q.layer_sensitivity(q, calibration, palettes, metric="model_output")
    assert set(sens) == set(names)
    for n, p in q.state_dict().items():  # every weight restored
        assert torch.equal(p, before[n]), n
    ref = outputs(q, calibration)
    name = "down_blocks.0.ff.fc1"
    layers[name].weight.data.copy_(palettes[name].dequantize())
    got = outputs(q, calibration)
    expected = sum((g - r).double().pow(2).sum() for g, r in zip(got, ref)) / sum(r.double().pow(2).sum() for r in ref)
    assert sens[name] == pytest.approx(expected.item(), rel=1e-6)
    assert all(v > 0 for v in sens.values())


def test_palettized_model_meets_bit_budget_and_stays_close(model, calibration, palettized):
    q, report = palettized
    assert 4.0 < report.average_bits <= 4.3
    assert report.num_high_bit_layers >= 1
    layers = Q.palettizable_layers(q)
    assert set(report.layer_bits) == set(layers)
    for name, module in layers.items():
        assert module.weight.unique().numel() <= 2 ** report.layer_bits[name], name
    # bits follow the model-output sensitivity per weight: the layer with the most error per weight is 8-bit
    assert Q.choose_layer_bits(report.sensitivity, report.numels, 4, 8, 4.3, per_bit=True) == report.layer_bits
    assert report.layer_bits[max(report.numels, key=lambda n: report.sensitivity[n] / report.numels[n])] == 8
    ref, got = outputs(model, calibration), outputs(q, calibration)
    assert min(Q.psnr(g, r) for g, r in zip(got, ref)) > 25.0


def test_palettized_save_load_roundtrip_is_exact_and_compact(tmp_path, model, calibration, palettized):
    q, report = palettized
    meta = Q.save_quantized(q, tmp_path / "pal")
    written = json.loads((tmp_path / "pal" / Q.QUANT_CONFIG_NAME).read_text())
    assert written["scheme"] == "palettize4"
    assert written["average_bits"] == pytest.approx(report.average_bits)
    assert written["average_bits_with_luts"] > written["average_bits"]
    model.save_pretrained(tmp_path / "fp32")
    fp32_size = (tmp_path / "fp32" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert meta["file_size_bytes"] < 0.45 * fp32_size
    loaded = Q.load_quantized(tmp_path / "pal")
    for a, b in zip(outputs(q, calibration), outputs(loaded, calibration)):
        assert torch.equal(a, b)
    assert Q.load_denoiser(tmp_path / "pal").config.hidden_size == model.config.hidden_size


def test_self_distillation_lowers_error_and_keeps_palettes(model, calibration, palettized):
    q = copy.deepcopy(palettized[0])
    before = {n: m.weight.clone() for n, m in Q.palettizable_layers(q).items()}
    losses = Q.self_distill_(q, model, calibration, steps=8, lr=1e-3, progress=False)
    assert sum(losses[-4:]) / 4 < losses[0]
    for name, module in Q.palettizable_layers(q).items():
        assert torch.equal(module.weight, before[name]), f"{name} palettized weight changed"
    assert all(p.requires_grad for p in q.parameters())  # flags restored


def test_self_distillation_with_luts_trains_palette_values_only(tmp_path, model, calibration, palettized):
    q = copy.deepcopy(palettized[0])
    before = {n: (m.palettized_weight.lut.clone(), m.palettized_weight.indices.clone()) for n, m in Q.palettizable_layers(q).items()}
    err_before = sum(F_mse(g, r) for g, r in zip(outputs(q, calibration), outputs(model, calibration)))
    losses = Q.self_distill_(q, model, calibration, steps=12, lr=1e-3, train_luts=True, progress=False)
    err_after = sum(F_mse(g, r) for g, r in zip(outputs(q, calibration), outputs(model, calibration)))
    assert err_after < err_before, (err_before, err_after)
    changed = 0
    for name, module in Q.palettizable_layers(q).items():
        pw = module.palettized_weight
        lut, idx = before[name]
        assert torch.equal(pw.indices, idx), f"{name}: indices must not change"
        assert pw.lut.shape == lut.shape
        assert torch.equal(pw.lut, pw.lut.half().float()), f"{name}: LUT not fp16-representable"
        assert torch.equal(module.weight, pw.dequantize()), f"{name}: weight out of sync with its LUT"
        changed += not torch.equal(pw.lut, lut)
    assert changed > len(before) // 2
    assert len(losses) == 12
    Q.save_quantized(q, tmp_path / "ft")
    for a, b in zip(outputs(q, calibration), outputs(Q.load_quantized(tmp_path / "ft"), calibration)):
        assert torch.equal(a, b)


def test_self_distillation_with_indices_reassigns_weights_and_stays_palettized(tmp_path, model, calibration, palettized):
    q = copy.deepcopy(palettized[0])
    before = {n: m.palettized_weight.indices.clone() for n, m in Q.palettizable_layers(q).items()}
    err_before = sum(F_mse(g, r) for g, r in zip(outputs(q, calibration), outputs(model, calibration)))
    Q.self_distill_(q, model, calibration, steps=12, lr=3e-4, train_indices=True, progress=False)
    err_after = sum(F_mse(g, r) for g, r in zip(outputs(q, calibration), outputs(model, calibration)))
    assert err_after < err_before, (err_before, err_after)
    moved = 0
    for name, module in Q.palettizable_layers(q).items():
        pw = module.palettized_weight
        assert pw.lut.shape[1] == 2**pw.nbits and int(pw.indices.max()) < 2**pw.nbits
        assert torch.equal(pw.lut, pw.lut.half().float()), f"{name}: LUT not fp16-representable"
        assert torch.equal(module.weight, pw.dequantize()), f"{name}: weight out of sync with its LUT"
        assert torch.unique(module.weight).numel() <= 2**pw.nbits
        moved += int((pw.indices.long() != before[name].long()).sum() > 0)
    assert moved > 0, "straight-through training never moved a weight to another LUT entry"
    Q.save_quantized(q, tmp_path / "qat")
    for a, b in zip(outputs(q, calibration), outputs(Q.load_quantized(tmp_path / "qat"), calibration)):
        assert torch.equal(a, b)


def test_self_distillation_on_guided_velocity(model, calibration, palettized):
    # batches stacked [conditional; unconditional]: the loss adds the guided velocity's error
    q = copy.deepcopy(palettized[0])

    def guided_error(m):
        return sum(F_mse(Q._guided(g, 3.0), Q._guided(r, 3.0)) for g, r in zip(outputs(m, calibration), outputs(model, calibration)))

    before = guided_error(q)
    losses = Q.self_distill_(q, model, calibration, steps=12, lr=3e-4, train_indices=True, guidance_scale=3.0, progress=False)
    assert guided_error(q) < before and len(losses) == 12
    v = torch.randn(4, 3, requires_grad=True)
    guided = Q._guided(v, 3.0)
    assert torch.allclose(guided, v[2:] + 3.0 * (v[:2] - v[2:]))
    guided.sum().backward()  # the guided term of the loss must reach the student
    assert torch.allclose(v.grad, torch.tensor([3.0, -2.0])[:, None].repeat_interleave(2, 0).expand(4, 3))


def test_nearest_entry_matches_argmin_for_unsorted_luts():
    torch.manual_seed(0)
    lut = torch.randn(3, 16)
    w = torch.randn(3, 200)
    expected = (w[:, :, None] - lut[:, None, :]).abs().argmin(-1)
    assert torch.equal(Q._nearest_entry(w, lut), expected)


def F_mse(a, b):
    return (a - b).double().pow(2).mean().item()


@pytest.mark.parametrize("scheme,min_psnr", [("int8", 40.0), ("8da4w", 25.0)])
def test_torchao_schemes_quantize_save_and_reload(tmp_path, model, calibration, scheme, min_psnr):
    q = copy.deepcopy(model)
    assert Q.quantize_(q, Q.config_for_scheme(scheme)) is None
    assert type(q.down_blocks[0].attn.to_q.weight).__name__ in ("Int8Tensor", "IntxUnpackedToInt8Tensor")
    ref, got = outputs(model, calibration), outputs(q, calibration)
    assert min(Q.psnr(g, r) for g, r in zip(got, ref)) > min_psnr
    Q.save_quantized(q, tmp_path / scheme)
    loaded = Q.load_quantized(tmp_path / scheme)
    for a, b in zip(got, outputs(loaded, calibration)):
        assert torch.equal(a, b)


def test_config_errors_name_the_problem(model):
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        Q.config_for_scheme("int3")
    with pytest.raises(ValueError, match="unknown PalettizeConfig key"):
        Q.config_for_scheme("palettize4", bits=4)
    with pytest.raises(ValueError, match="target_avg_bits"):
        Q.PalettizeConfig(target_avg_bits=9.0)
    with pytest.raises(ValueError, match="nbits"):
        Q.PalettizeConfig(nbits=5)
    with pytest.raises(ValueError, match="assignment"):
        Q.PalettizeConfig(assignment="round")
    with pytest.raises(ValueError, match="group_size"):
        Q.Int8DynActInt4Weight(group_size=24)
    with pytest.raises(ValueError, match="calibration"):
        Q.quantize_(copy.deepcopy(model), Q.PalettizeConfig(), calibration=None, progress=False)
    with pytest.raises(ValueError, match="sensitivity_batches"):
        Q.quantize_(copy.deepcopy(model), Q.PalettizeConfig(), calibration=[{}], sensitivity_batches=0, progress=False)


def test_sensitivity_batches_caps_the_ranking_but_gptq_statistics_use_every_batch(model, monkeypatch):
    batches = Q.random_calibration(model, num_batches=4, batch_size=1)
    seen = {}
    real_moments, real_sensitivity = Q.input_second_moments, Q.layer_sensitivity

    def moments(m, layers, calibration):
        seen["moments"] = list(calibration)
        return real_moments(m, layers, calibration)

    def sensitivity(m, calibration, *args, **kwargs):
        seen["ranking"] = list(calibration)
        return real_sensitivity(m, calibration, *args, **kwargs)

    monkeypatch.setattr(Q, "input_second_moments", moments)
    monkeypatch.setattr(Q, "layer_sensitivity", sensitivity)
    Q.quantize_(copy.deepcopy(model), Q.PalettizeConfig(), calibration=batches, sensitivity_batches=2, progress=False)
    assert [id(b) for b in seen["moments"]] == [id(b) for b in batches]
    assert [id(b) for b in seen["ranking"]] == [id(batches[0]), id(batches[2])]  # evenly spaced


def test_load_errors_say_which_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a quantized checkpoint"):
        Q.load_quantized(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Q.load_denoiser(tmp_path / "missing")


def test_psnr():
    x = torch.linspace(-1, 1, 100)
    assert Q.psnr(x, x) == float("inf")
    noisy = x + 0.01
    assert Q.psnr(noisy, x, peak=2.0) == pytest.approx(20 * torch.log10(torch.tensor(2.0 / 0.01)).item(), rel=1e-4)


def _output_error(w, wq, h):
    d = (w - wq).double()
    return torch.einsum("ij,jk,ik->", d, h.double(), d).item()


def test_gptq_assignment_lowers_layer_output_error_and_keeps_the_palette():
    torch.manual_seed(0)
    w = torch.randn(24, 32)
    mix = torch.randn(32, 32)  # correlated inputs: what GPTQ exploits and nearest rounding ignores
    x = torch.randn(512, 32) @ mix
    h = x.T @ x / len(x)
    nearest = Q.palettize_weight(w, nbits=3)
    gptq, latent = Q.gptq_palettize(w, nearest, h)
    assert torch.equal(gptq.lut, nearest.lut) and gptq.indices.dtype == nearest.indices.dtype
    assert int(gptq.indices.max()) < 8
    assert _output_error(w, gptq.dequantize(), h) < 0.7 * _output_error(w, nearest.dequantize(), h)
    # the compensated weight is where QAT starts: its nearest entries are exactly the assigned indices
    assert torch.equal(Q._nearest_entry(latent.reshape(1, -1), gptq.lut).reshape(w.shape), gptq.indices.long())
    # per-channel-group LUTs: each row uses its own group's table
    grouped = Q.palettize_weight(w, nbits=3, granularity="per_grouped_channel", group_size=8)
    g2, _ = Q.gptq_palettize(w, grouped, h)
    assert g2.lut.shape == (3, 8)
    assert _output_error(w, g2.dequantize(), h) < _output_error(w, grouped.dequantize(), h)


def test_gptq_assignment_never_does_worse_than_nearest():
    # white inputs: nearest rounding is already optimal for the output error; a rank-1 H is ill-conditioned
    torch.manual_seed(1)
    w = torch.randn(16, 12)
    nearest = Q.palettize_weight(w, nbits=2)
    v = torch.randn(12, 1)
    for h in (torch.eye(12), v @ v.T):
        pw, latent = Q.gptq_palettize(w, nearest, h)
        assert _output_error(w, pw.dequantize(), h) <= _output_error(w, nearest.dequantize(), h) + 1e-9
    # an input that was always zero in calibration: its column keeps plain rounding of the original weight
    x = torch.randn(256, 12) @ torch.randn(12, 12)
    x[:, 3] = 0
    pw, latent = Q.gptq_palettize(w, nearest, x.T @ x / len(x))
    assert torch.equal(pw.indices[:, 3], nearest.indices[:, 3])
    assert torch.equal(latent[:, 3], w[:, 3])


def test_gptq_palettized_model_is_closer_than_nearest_and_qat_starts_from_it(model, calibration):
    # the default config assigns GPTQ-style; nearest is the plain k-means rounding
    assert Q.PalettizeConfig().assignment == "gptq"
    errors = {}
    for assignment in ("nearest", "gptq"):
        q = copy.deepcopy(model)
        Q.quantize_(q, Q.PalettizeConfig(target_avg_bits=4.0, assignment=assignment), calibration=calibration, progress=False)
        errors[assignment] = sum(F_mse(g, r) for g, r in zip(outputs(q, calibration), outputs(model, calibration)))
        for name, module in Q.palettizable_layers(q).items():
            assert torch.equal(module.weight, module.palettized_weight.dequantize()), name
            latent = getattr(module, "palettized_latent", None)
            assert (latent is not None) == (assignment == "gptq" and isinstance(module, torch.nn.Linear)), name
    assert errors["gptq"] < errors["nearest"], errors
    # QAT from the compensated weights: zero learning rate keeps GPTQ's indices (from the teacher's weights
    # it would snap back to nearest rounding)
    Q.self_distill_(q, model, calibration, steps=1, lr=0.0, train_indices=True, progress=False)
    after = sum(F_mse(g, r) for g, r in zip(outputs(q, calibration), outputs(model, calibration)))
    assert after == pytest.approx(errors["gptq"], rel=1e-5)
