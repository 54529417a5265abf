"""Core ML export (.mlpackage, ML program) through torch.export + coremltools.

Converts on any OS; running the package (`MLModel.predict`) needs macOS, so on Linux parity is checked on
the torch.export program that coremltools converts, and the package itself is only checked structurally.
Palettized models are stored with Core ML's own LUT weights: `palettize_weights(mode="unique")` finds the
2^nbits values each weight already has, so the file holds the same LUTs and indices the PyTorch model
uses. int8 weight-only maps to `linear_quantize_weights` (int8 symmetric).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Union

import torch

from .graphs import GraphSpec

SUFFIX = ".mlpackage"


def _ct():
    for name in ("coremltools",):
        logging.getLogger(name).setLevel(logging.ERROR)
    import coremltools as ct

    return ct


def export_coreml(
    spec: GraphSpec,
    path: Union[str, os.PathLike],
    weight_compression: Optional[str] = None,
    compute_precision: str = "float32",
    minimum_deployment_target: str = "iOS17",
) -> Path:
    """Convert `spec.module` at its example shapes to an ML program package at `path`.

    weight_compression: None, "palettize" (keep the model's existing palettes) or "int8".
    compute_precision: "float32" (matches PyTorch) or "float16" (what the Neural Engine runs).
    """
    ct = _ct()
    path = Path(path)
    if compute_precision not in ("float32", "float16"):
        raise ValueError(f"compute_precision must be 'float32' or 'float16', got {compute_precision!r}")
    with torch.no_grad():
        program = torch.export.export(spec.module, spec.example_inputs, strict=False).run_decompositions()
    check_max_rank(program, spec.name)
    inputs = [
        ct.TensorType(name=n, shape=tuple(x.shape), dtype=_ct_dtype(x.dtype))
        for n, x in zip(spec.input_names, spec.example_inputs)
    ]
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink):
        mlmodel = ct.convert(
            program,
            inputs=inputs,
            outputs=[ct.TensorType(name=n) for n in spec.output_names],
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, minimum_deployment_target),
            compute_precision=ct.precision.FLOAT32 if compute_precision == "float32" else ct.precision.FLOAT16,
        )
        if weight_compression == "palettize":
            from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

            mlmodel = palettize_weights(mlmodel, OptimizationConfig(global_config=OpPalettizerConfig(mode="unique", weight_threshold=0)))
        elif weight_compression == "int8":
            from coremltools.optimize.coreml import OpLinearQuantizerConfig, OptimizationConfig, linear_quantize_weights

            cfg = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=0)
            mlmodel = linear_quantize_weights(mlmodel, OptimizationConfig(global_config=cfg))
        elif weight_compression is not None:
            raise ValueError(f"weight_compression must be None, 'palettize' or 'int8', got {weight_compression!r}")
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mlmodel.save(str(path))
    return path


class CoreMLConversionError(ValueError):
    """The graph uses something Core ML cannot represent."""


def high_rank_ops(program, max_rank: int = 5) -> list[str]:
    """Ops of an ExportedProgram whose outputs have rank > max_rank, with the source line that made them."""
    found = []
    for node in program.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > max_rank:
            where = ""
            trace = node.meta.get("stack_trace") or ""
            lines = [l.strip() for l in trace.strip().splitlines() if l.strip().startswith("File")]
            if lines:
                where = " at " + lines[-1].replace("File ", "")
            found.append(f"{node.target} -> rank {val.dim()} {tuple(val.shape)}{where}")
    return found


def check_max_rank(program, name: str, max_rank: int = 5) -> None:
    """Core ML tensors have rank <= 5; fail before conversion with the offending source lines."""
    bad = high_rank_ops(program, max_rank)
    if bad:
        listing = "\n  ".join(bad[:12])
        raise CoreMLConversionError(
            f"{name}: Core ML supports tensors of rank <= {max_rank}, but the exported graph has {len(bad)} op(s) with "
            f"higher rank (fold a dimension into its neighbour to fix them):\n  {listing}"
        )


def _ct_dtype(dtype: torch.dtype):
    import numpy as np

    if dtype in (torch.int32, torch.int64):
        return np.int32
    if dtype == torch.float16:
        return np.float16
    return np.float32


def coreml_op_counts(path: Union[str, os.PathLike]) -> dict:
    """Op types in a saved package's main function (e.g. to check that LUT weights are present)."""
    ct = _ct()
    from collections import Counter

    spec = ct.utils.load_spec(str(path))
    counts = Counter()
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                counts[op.type] += 1
    return dict(counts)


def can_run_coreml() -> bool:
    """Core ML prediction exists only on macOS."""
    return sys.platform == "darwin"


class CoreMLRunner:
    """MLModel.predict behind the same call as the other runners (macOS only)."""

    runtime = "coreml"

    def __init__(self, path: Union[str, os.PathLike], input_names, output_name: str):
        if not can_run_coreml():
            raise RuntimeError("Core ML models can only be run on macOS; on this machine parity is checked on the torch.export program")
        ct = _ct()
        self.model = ct.models.MLModel(str(path))
        self.input_names, self.output_name = list(input_names), output_name

    def __call__(self, *inputs):
        feed = {n: x.numpy().astype("int32" if x.dtype in (torch.int32, torch.int64) else "float32") for n, x in zip(self.input_names, inputs)}
        return torch.from_numpy(self.model.predict(feed)[self.output_name])
