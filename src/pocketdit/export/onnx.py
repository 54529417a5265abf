"""ONNX export (torch.onnx, dynamo exporter) and a runner over onnxruntime's CPU provider.

Palettized models export their float weights (ONNX has no LUT weight type that onnxruntime runs); the
int8 schemes are exported by onnxruntime's own dynamic quantizer on the float graph instead of torchao's
tensor subclasses, which the ONNX exporter does not take.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

from .graphs import GraphSpec

SUFFIX = ".onnx"


def export_onnx(spec: GraphSpec, path: Union[str, os.PathLike], opset: int = 20) -> Path:
    """Export `spec.module` at its static example shapes to a single-file ONNX model at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            spec.module,
            spec.example_inputs,
            dynamo=False,
            opset_version=opset,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            verbose=False,
            f=str(path),
        )
    return path


def quantize_onnx_int8(path: Union[str, os.PathLike], out: Optional[Union[str, os.PathLike]] = None) -> Path:
    """onnxruntime dynamic int8 quantization (int8 weights, dynamically quantized activations) of a model."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = Path(path)
    out = Path(out) if out is not None else path
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return out


class OnnxRunner:
    """An onnxruntime CPU session; call it with tensors in the graph's input order."""

    runtime = "onnxruntime"

    def __init__(self, path: Union[str, os.PathLike], threads: Optional[int] = None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} not found; export one with `pocketdit export --format onnx`")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.path = path
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.path.name} takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        feed = {n: x.detach().cpu().numpy() for n, x in zip(self.input_names, inputs)}
        return torch.from_numpy(self.session.run(None, feed)[0])
