"""ExecuTorch export (.pte with the XNNPACK delegate) and a runner over the ExecuTorch runtime.

torch.export -> to_edge_transform_and_lower(XnnpackPartitioner) -> to_executorch. Models quantized with
torchao's Int8DynActInt4Weight/Int8WeightOnly export as quantize/dequantize patterns that the XNNPACK
partitioner lowers to its integer kernels; palettized models export their (de-palettized) float weights.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Union

import torch

from .graphs import GraphSpec, decompose_layer_norms

SUFFIX = ".pte"


def export_executorch(spec: GraphSpec, path: Union[str, os.PathLike], decompose_norms: bool = True) -> Path:
    """Lower `spec.module` at its example shapes to an XNNPACK-delegated ExecuTorch program at `path`.

    decompose_norms: export a copy whose LayerNorms are written as XNNPACK-supported elementwise ops
    (`graphs.decompose_layer_norms`), so the graph is delegated in far fewer pieces (faster to lower, faster
    to run). Parity is still checked against the unmodified eager module.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    path = Path(path)
    module = spec.module
    if decompose_norms:
        module = decompose_layer_norms(copy.deepcopy(module))
    with torch.no_grad():
        program = torch.export.export(module, spec.example_inputs, strict=False)
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
        et_program = edge.to_executorch()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(et_program.buffer)
    return path


class ExecuTorchRunner:
    """Load a .pte once; call it with tensors, get the first output tensor back."""

    runtime = "executorch"

    def __init__(self, path: Union[str, os.PathLike]):
        from executorch.runtime import Runtime

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ExecuTorch program {path} not found; export one with `pocketdit export --format executorch`")
        self.path = path
        self.program = Runtime.get().load_program(path)
        self.method = self.program.load_method("forward")

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.method.execute([x.contiguous() for x in inputs])[0]
