"""Saving and loading quantized PocketDiTs: bit-packed indices, palettized and torchao files, errors
(pocketdit.quantize.storage)."""

import copy
import json

import pytest
import torch

from pocketdit import quantize as Q


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
def test_pack_unpack_roundtrip(nbits):
    g = torch.Generator().manual_seed(nbits)
    idx = torch.randint(0, 2**nbits, (7, 13), generator=g).to(torch.uint8)
    packed = Q.pack_indices(idx, nbits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (idx.numel() * nbits + 7) // 8
    assert torch.equal(Q.unpack_indices(packed, nbits, idx.shape), idx)


def test_palettized_save_load_roundtrip_is_exact_and_compact(tmp_path, model, calibration, palettized, outputs):
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


@pytest.mark.parametrize("scheme,min_psnr", [("int8", 40.0), ("8da4w", 25.0)])
def test_torchao_schemes_quantize_save_and_reload(tmp_path, model, calibration, scheme, min_psnr, outputs):
    q = copy.deepcopy(model)
    assert Q.quantize_(q, Q.config_for_scheme(scheme)) is None
    assert type(q.down_blocks[0].attn.to_q.weight).__name__ in ("Int8Tensor", "IntxUnpackedToInt8Tensor")
    ref, got = outputs(model, calibration), outputs(q, calibration)
    assert min(Q.psnr(g, r) for g, r in zip(got, ref)) > min_psnr
    Q.save_quantized(q, tmp_path / scheme)
    loaded = Q.load_quantized(tmp_path / scheme)
    for a, b in zip(got, outputs(loaded, calibration)):
        assert torch.equal(a, b)


def test_load_errors_say_which_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a quantized checkpoint"):
        Q.load_quantized(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Q.load_denoiser(tmp_path / "missing")
