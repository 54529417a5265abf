"""Export of the nano preset: ONNX (onnxruntime), ExecuTorch (XNNPACK, runtime), Core ML (conversion only on
Linux), parity checks, the reference attention under export, and the CLI."""

import copy
import json

import pytest
import torch

from pocketdit import quantize as Q
from pocketdit.attention import backends
from pocketdit.autoencoder import TinyAutoencoder
from pocketdit.export import DeploymentParts, ExportConfig, ParityError, export_pipeline
from pocketdit.export.graphs import decoder_spec, denoiser_spec, fresh_inputs, text_encoder_spec
from pocketdit.export.parity import check_graph
from pocketdit.model import PocketDiT
from pocketdit.text import TextEncoder


class TinyBert(TextEncoder):
    """A 1-layer random BERT standing in for MiniLM (same graph structure, seconds to export)."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        self.model = BertModel(
            BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       max_position_embeddings=16)
        )
        self.max_length, self.embed_dim, self.name = 8, 32, "tiny-bert"
        self._freeze()


class Conditioner:
    def __init__(self, encoder):
        self.encoders = [encoder]
        self.names = (encoder.name,)


def nano(**overrides):
    torch.manual_seed(0)
    model = PocketDiT.from_preset("nano", **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def tiny_autoencoder():
    torch.manual_seed(0)
    return TinyAutoencoder(encoder_block_out_channels=(8, 16), decoder_block_out_channels=(16, 8), norm_num_groups=4).eval()


@pytest.fixture(scope="module")
def parts():
    return DeploymentParts(nano(), Conditioner(TinyBert()), tiny_autoencoder(), shift=1.0, source="test")


# ----------------------------------------------------------------------------------------------------
def test_onnx_pipeline_parity(tmp_path, parts):
    result = export_pipeline(parts, tmp_path, ExportConfig(format="onnx", resolution=32), progress=False)
    assert set(result.files) == {"text_encoder", "denoiser", "decoder"}
    for name, par in result.parity.items():
        assert par.psnr >= 35.0, name
    manifest = json.loads((tmp_path / "export.json").read_text())
    den = manifest["graphs"]["denoiser"]
    assert [i["name"] for i in den["inputs"]] == ["latents", "timestep", "text_states_0", "text_mask_0"]
    assert den["inputs"][0]["shape"] == [1, 4, 16, 16]  # 32 px / factor 2
    assert manifest["graphs"]["text_encoder"]["inputs"][0]["dtype"] == "int32"
    assert manifest["image_parity"]["psnr_db"] is None or manifest["image_parity"]["psnr_db"] >= 35.0


def test_onnx_int8_and_palettized(tmp_path, parts):
    bare = DeploymentParts(parts.transformer, None, None, 1.0, "test")
    r8 = export_pipeline(bare, tmp_path / "int8", ExportConfig(format="onnx", resolution=16, quantize="int8"), progress=False)
    fp = export_pipeline(bare, tmp_path / "fp", ExportConfig(format="onnx", resolution=16), progress=False)
    assert r8.sizes["denoiser"] < 0.6 * fp.sizes["denoiser"]
    assert r8.parity["denoiser"].psnr >= 30.0
    rp = export_pipeline(bare, tmp_path / "pal", ExportConfig(format="onnx", resolution=16, quantize="palettize4"), progress=False)
    assert rp.parity["denoiser"].psnr >= 35.0  # vs the palettized eager model: same weights
    assert json.loads((tmp_path / "pal" / "export.json").read_text())["quantization"]["average_bits"] <= 4.3


def test_executorch_denoiser_runs_in_runtime_with_parity(tmp_path):
    # No Middle blocks: half the graph (XNNPACK lowering is the slowest step of the export tests); the
    # Down/Up ASSA blocks, merge/split and every op kind are still there.
    bare = DeploymentParts(nano(depth_mid=0), None, None, 1.0, "test")
    result = export_pipeline(bare, tmp_path, ExportConfig(format="executorch", resolution=16), progress=False)
    assert (tmp_path / "denoiser.pte").stat().st_size > 0
    assert result.parity["denoiser"].psnr >= 35.0
    assert result.parity["image"].psnr >= 35.0
    assert result.parity["denoiser"].runtime == "executorch"


def test_executorch_refuses_int8_weight_only(tmp_path):
    bare = DeploymentParts(nano(), None, None, 1.0, "test")
    with pytest.raises(ValueError, match="8da4w"):
        export_pipeline(bare, tmp_path, ExportConfig(format="executorch", resolution=16, quantize="int8"), progress=False)


def test_coreml_converts_text_encoder_and_palettized_decoder(tmp_path, parts):
    from pocketdit.export.coreml import coreml_op_counts, export_coreml

    export_coreml(text_encoder_spec(parts.text_conditioner.encoders[0]), tmp_path / "text.mlpackage")
    assert (tmp_path / "text.mlpackage" / "Manifest.json").is_file()
    ae = copy.deepcopy(parts.autoencoder)
    Q.quantize_(ae, Q.PalettizeConfig(nbits=4, target_avg_bits=4.0, assignment="nearest"), progress=False)
    export_coreml(decoder_spec(ae, 8), tmp_path / "dec.mlpackage", weight_compression="palettize")
    ops = coreml_op_counts(tmp_path / "dec.mlpackage")
    assert any("lut_to_dense" in op for op in ops), ops  # weights stored as LUT + indices


def test_coreml_denoiser_converts(tmp_path):
    """Core ML tensors are rank <= 5; the model and reference attention keep to that, so the denoiser converts."""
    from pocketdit.export.coreml import export_coreml

    spec = denoiser_spec(nano(), 16)
    export_coreml(spec, tmp_path / "den.mlpackage")
    assert (tmp_path / "den.mlpackage").is_dir()


def test_export_uses_reference_attention(monkeypatch):
    """Under torch.export the BNA dispatch must pick the plain reference, never a registered fast path."""

    def refuse(*args, **kwargs):
        raise AssertionError("a fast BNA backend was dispatched while exporting")

    for name in ("bna_dispatch", "assa_dispatch"):
        if hasattr(backends, name):
            monkeypatch.setattr(backends, name, refuse)
    model = nano()
    for blk in model.blocks():
        blk.attn.backend = "auto"
    spec = denoiser_spec(model, 16)
    program = torch.export.export(spec.module, spec.example_inputs, strict=False)
    inputs = fresh_inputs(spec, 3)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.allclose(program.module()(*inputs), spec.module(*inputs), atol=1e-5)


def test_parity_failure_reports_the_number():
    spec = denoiser_spec(nano(), 16)

    def noisy(*inputs):
        out = spec.module(*inputs)
        return out + 0.05 * out.abs().max() * torch.randn_like(out)

    with pytest.raises(ParityError, match=r"PSNR \d+\.\d+ dB < 35"):
        check_graph(spec, noisy, "noisy-runtime")


def test_bad_resolution_is_a_clear_error(tmp_path, parts):
    with pytest.raises(ValueError, match="downsample factor"):
        export_pipeline(parts, tmp_path, ExportConfig(format="onnx", resolution=33), progress=False)
    with pytest.raises(ValueError, match="format"):
        ExportConfig(format="tflite")


def test_cli_quantize_and_export(tmp_path, capsys):
    from pocketdit.export.cli import export_command
    from pocketdit.quantize.cli import quantize_command

    nano().save_pretrained(tmp_path / "ckpt")
    assert quantize_command([str(tmp_path / "ckpt"), "--scheme", "int8", "-o", str(tmp_path / "q")]) == 0
    assert json.loads((tmp_path / "q" / "quantize_report.json").read_text())["scheme"] == "int8"
    rc = export_command([str(tmp_path / "ckpt"), "--format", "onnx", "--resolution", "16", "-o", str(tmp_path / "onnx")])
    assert rc == 0
    assert "denoiser: PSNR" in capsys.readouterr().out
    assert export_command([str(tmp_path / "missing"), "--format", "onnx", "--resolution", "16"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# ExecuTorch: rewrites that keep the graph inside the XNNPACK delegate
# ----------------------------------------------------------------------------------------------------
# Ops that ran outside XNNPACK before the rewrites (in ExecuTorch's portable kernels, each cutting the graph).
_PORTABLE_ONLY = ("aten_index_tensor", "aten_expand_copy_default", "aten_where_self", "aten_any_dim", "aten_mean_dim",
                  "aten_select_copy_int", "aten_unsqueeze_copy_default", "aten_squeeze_copy_dims", "aten_logical_not_default",
                  "aten_eq_scalar", "aten_mul_scalar")


class _AttentionOps(torch.nn.Module):
    """Every op kind the XNNPACK rewrites handle: adaLN-style unbind + [:, None], decomposed LayerNorm (mean
    over the last dim), GQA (expand), blockwise-neighbourhood gather with a constant index, SDPA with a
    boolean mask, a cat listing one tensor twice."""

    def __init__(self):
        super().__init__()
        from pocketdit.export.graphs import DecomposedLayerNorm

        torch.manual_seed(0)
        self.norm = DecomposedLayerNorm(torch.nn.LayerNorm(16))
        self.q, self.kv, self.out = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16), torch.nn.Linear(32, 16)

    def forward(self, x, mod, mask):
        from pocketdit.attention.functional import attention, bna_reference

        shift, scale = mod.unbind(1)
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        q = self.q(h).view(1, 16, 4, 4).transpose(1, 2)
        kv = self.kv(h).view(1, 16, 2, 8).transpose(1, 2)
        k, v = kv[..., :4], kv[..., 4:]
        y = bna_reference(q, k, v, num_blocks=4, radius=1) + attention(q, k, v, (mask > 0.5)[:, None, None, :])
        y = y.transpose(1, 2).reshape(1, 16, 16)
        return self.out(torch.cat([y, y], dim=-1))


def _attention_ops_spec(seed=0):
    from pocketdit.export.graphs import GraphSpec

    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(1, 16, generator=g) > 0.5).float()
    mask[:, 0] = 1.0  # SDPA and its rewrite differ only on rows with every key masked
    inputs = (torch.randn(1, 16, 16, generator=g), torch.randn(1, 2, 16, generator=g), mask)
    return GraphSpec("ops", _AttentionOps().eval(), inputs, ["x", "mod", "text_mask_0"], ["y"])


def test_sdpa_as_matmuls_matches_sdpa():
    from pocketdit.export.executorch import sdpa_as_matmuls

    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 8, generator=g) for h, n in ((4, 6), (2, 5), (2, 5)))
    kf, vf = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    bool_mask = torch.rand(2, 1, 6, 5, generator=g) > 0.3
    bool_mask[..., 0] = True
    float_mask = torch.randn(2, 4, 6, 5, generator=g)
    cases = [((q, kf, vf), {}), ((q, kf, vf), {"attn_mask": bool_mask}), ((q, kf, vf), {"attn_mask": float_mask}),
             ((q, kf, vf), {"scale": 0.3}), ((q, kf[:, :, :5], vf), {"is_causal": True}), ((q, k, v), {"enable_gqa": True}),
             ((q, k, v), {"enable_gqa": True, "attn_mask": bool_mask}), ((q, k, v), {"enable_gqa": True, "attn_mask": float_mask[0, 0]})]
    for args, kwargs in cases:
        torch.testing.assert_close(sdpa_as_matmuls(*args, **kwargs), F.scaled_dot_product_attention(*args, **kwargs),
                                   atol=1e-5, rtol=1e-5, msg=str(kwargs))


def test_xnnpack_friendly_ops_pass_keeps_values():
    """The edge-dialect rewrite alone (no lowering): same outputs, and none of the ops it rewrites remain."""
    from executorch.exir import to_edge

    from pocketdit.export.executorch import XnnpackFriendlyOps, decompose_sdpa

    spec = _attention_ops_spec()
    with torch.no_grad():
        program = decompose_sdpa(torch.export.export(spec.module, spec.example_inputs, strict=False))
        edge = to_edge(program).exported_program()
        targets = lambda: {str(n.target) for n in edge.graph.nodes if n.op == "call_function"}
        assert any("index.Tensor" in t for t in targets()) and any("expand_copy" in t for t in targets())
        assert XnnpackFriendlyOps()(edge).modified
        left = targets()
        for op in ("index.Tensor", "expand_copy", "select_copy", "unsqueeze_copy", "squeeze_copy", "where"):
            assert not any(op in t for t in left), (op, sorted(left))
        for seed in (1, 2):
            inputs = _attention_ops_spec(seed).example_inputs
            torch.testing.assert_close(edge.module()(*inputs), spec.module(*inputs), atol=1e-5, rtol=1e-5)


def test_executorch_rewrites_give_one_xnnpack_call_with_parity(tmp_path):
    from pocketdit.export.executorch import ExecuTorchRunner, delegation_summary, lower_to_edge

    spec = _attention_ops_spec()
    plain = delegation_summary(lower_to_edge(spec, xnnpack_rewrites=False))
    assert plain["delegate_calls"] > 1 and set(plain["ops_outside"]) & set(_PORTABLE_ONLY)  # what the rewrites fix
    edge = lower_to_edge(spec)
    summary = delegation_summary(edge)
    assert summary["delegate_calls"] == 1, summary
    assert not set(summary["ops_outside"]) & set(_PORTABLE_ONLY), summary
    (tmp_path / "ops.pte").write_bytes(edge.to_executorch().buffer)
    runner = ExecuTorchRunner(tmp_path / "ops.pte", threads=1)
    par = check_graph(spec, runner, "executorch", min_psnr=80.0)
    assert par.psnr >= 80.0


def test_executorch_denoiser_is_one_xnnpack_call():
    from pocketdit.export.executorch import delegation_summary, lower_to_edge

    summary = delegation_summary(lower_to_edge(denoiser_spec(nano(depth_mid=0), 16)))
    assert summary["delegate_calls"] == 1, summary
    assert not set(summary["ops_outside"]) & set(_PORTABLE_ONLY), summary
