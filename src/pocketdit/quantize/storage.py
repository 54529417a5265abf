"""Quantized PocketDiT checkpoints on disk: safetensors + JSON, never pickle.

Palettized: fp16 LUTs and bit-packed indices for palettized layers, fp32 for the rest
(`palettized.safetensors`); torchao: the quantized tensors flattened by torchao's safetensors support
(`torchao.safetensors`); either with `quantization_config.json` beside config.json. `load_quantized`
rebuilds the model, `QuantizedPocketDiT` is the class a pipeline's model_index.json names for it, and
`load_denoiser` loads any PocketDiT directory, quantized or not.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
from diffusers.models.modeling_utils import ModelMixin

from ..model import PocketDiT
from ..utils import read_json
from .palettize import PalettizedWeight, palettized_layers

QUANT_CONFIG_NAME = "quantization_config.json"
PALETTIZED_WEIGHTS_NAME = "palettized.safetensors"
TORCHAO_WEIGHTS_NAME = "torchao.safetensors"


# ----------------------------------------------------------------------------------------------------
# Bit-packed indices
# ----------------------------------------------------------------------------------------------------
def pack_indices(indices: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack integer indices < 2^nbits into a flat uint8 tensor (little-endian bit order, zero padded)."""
    flat = indices.reshape(-1).to(torch.int64)
    if nbits == 8:
        return flat.to(torch.uint8)
    bits = ((flat[:, None] >> torch.arange(nbits)) & 1).reshape(-1)
    pad = (-bits.numel()) % 8
    bits = torch.cat([bits, bits.new_zeros(pad)]).reshape(-1, 8)
    return (bits << torch.arange(8)).sum(1).to(torch.uint8)


def unpack_indices(packed: torch.Tensor, nbits: int, shape) -> torch.Tensor:
    n = math.prod(shape)
    if nbits == 8:
        return packed[:n].reshape(shape)
    bits = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[: n * nbits].reshape(n, nbits)
    return (bits << torch.arange(nbits)).sum(1).to(torch.uint8).reshape(shape)


# ----------------------------------------------------------------------------------------------------
# Save and load
# ----------------------------------------------------------------------------------------------------
def save_quantized(model: nn.Module, directory: Union[str, os.PathLike]) -> dict:
    """Write a quantized PocketDiT to `directory`: config.json, weights (safetensors), quantization_config.json.

    Palettized: LUTs (fp16) and bit-packed indices for palettized layers, fp32 for everything else.
    torchao: the quantized tensors flattened by torchao's safetensors support. Returns the quantization
    config written (with file size and average bits).
    """
    from safetensors.torch import save_file

    info = getattr(model, "_pocketdit_quantization", None)
    if info is None:
        raise ValueError("model is not quantized; call pocketdit.quantize.quantize_ first")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_config(out)
    meta = {"scheme": info["scheme"], "config": info["config"]}
    if info["scheme"] == "palettize4":
        palettes = palettized_layers(model)
        tensors, layers = {}, {}
        for name, pw in palettes.items():
            tensors[f"{name}.weight.lut"] = pw.lut.half().contiguous()
            tensors[f"{name}.weight.indices"] = pack_indices(pw.indices, pw.nbits)
            layers[name] = {"nbits": pw.nbits, "shape": list(pw.shape), "groups": pw.lut.shape[0]}
        skip = {f"{n}.weight" for n in palettes}
        for key, value in model.state_dict().items():
            if key not in skip:
                tensors[key] = value.detach().float().contiguous()
        path = out / PALETTIZED_WEIGHTS_NAME
        save_file(tensors, str(path), metadata={"format": "pocketdit-palettized", "layers": json.dumps(layers)})
        report = info.get("report", {})
        numels = {n: math.prod(l["shape"]) for n, l in layers.items()}
        total = sum(numels.values())
        meta.update(
            weights=PALETTIZED_WEIGHTS_NAME,
            average_bits=sum(layers[n]["nbits"] * numels[n] for n in layers) / max(total, 1),
            average_bits_with_luts=sum(p.storage_bits() for p in palettes.values()) / max(total, 1),
            palettized_weights=total,
            layer_bits={n: l["nbits"] for n, l in layers.items()},
            sensitivity=report.get("sensitivity", {}),
        )
    else:
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        # torchao's flattener splits keys at their last dot; a prefix keeps top-level parameters valid.
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors, metadata = flatten_tensor_state_dict(state)
        path = out / TORCHAO_WEIGHTS_NAME
        save_file(tensors, str(path), metadata=metadata)
        meta.update(weights=TORCHAO_WEIGHTS_NAME)
    meta["file_size_bytes"] = path.stat().st_size
    (out / QUANT_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_quantized(directory: Union[str, os.PathLike]):
    """Rebuild a quantized PocketDiT written by `save_quantized` (no pickle involved)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    d = Path(directory)
    qpath = d / QUANT_CONFIG_NAME
    if not qpath.is_file():
        raise FileNotFoundError(f"{qpath} not found: {d} is not a quantized checkpoint (make one with `pocketdit quantize`)")
    meta = read_json(qpath)
    if not isinstance(meta, dict) or meta.get("scheme") not in ("palettize4", "int8", "8da4w") or "config" not in meta:
        raise ValueError(f"{qpath} does not describe a quantized PocketDiT (no known 'scheme' and 'config' entries)")
    wpath = d / meta.get("weights", "")
    if not wpath.is_file():
        raise FileNotFoundError(f"{wpath} not found; the quantized checkpoint in {d} is incomplete")
    read_json(d / "config.json")
    model = PocketDiT.from_config(PocketDiT.load_config(d)).eval()
    try:
        tensors = load_file(str(wpath))
        with safe_open(str(wpath), "pt") as f:
            file_meta = f.metadata() or {}
    except Exception as e:  # safetensors raises several error types for truncated/corrupt files
        raise ValueError(f"cannot read {wpath}: {e}") from e
    if meta["scheme"] == "palettize4":
        layers = json.loads(file_meta.get("layers", "{}"))
        modules = dict(model.named_modules())
        state = {k: v for k, v in tensors.items() if not (k.endswith(".weight.lut") or k.endswith(".weight.indices"))}
        for name, spec in layers.items():
            idx = unpack_indices(tensors[f"{name}.weight.indices"], spec["nbits"], spec["shape"])
            pw = PalettizedWeight(tensors[f"{name}.weight.lut"].float(), idx, spec["nbits"])
            state[f"{name}.weight"] = pw.dequantize()
            modules[name].palettized_weight = pw
        model.load_state_dict(state, strict=True)
    else:
        from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

        state, leftover = unflatten_tensor_state_dict(tensors, file_meta)
        if leftover:
            raise ValueError(f"{wpath}: unexpected tensors {sorted(leftover)[:5]}")
        model.load_state_dict({k[len("model.") :]: v for k, v in state.items()}, strict=True, assign=True)
    model._pocketdit_quantization = {"scheme": meta["scheme"], "config": meta["config"]}
    return model


class QuantizedPocketDiT(ModelMixin):
    """The model_index.json entry ["pocketdit.quantize", "QuantizedPocketDiT"] of a pipeline whose transformer/
    was written by `save_quantized`: `from_pretrained(dir)` is `load_quantized(dir)` (a PocketDiT with
    quantized weights; this class is never instantiated). Loading kwargs that DiffusionPipeline passes to
    every model (torch_dtype, device_map, ...) do not apply to quantized weights and are ignored."""

    def __init__(self):
        raise TypeError("QuantizedPocketDiT only loads: use QuantizedPocketDiT.from_pretrained(dir) or load_quantized(dir)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return load_quantized(pretrained_model_name_or_path)


def load_denoiser(path: Union[str, os.PathLike]):
    """A PocketDiT from a path: a quantized checkpoint, a save_pretrained directory, or a pipeline
    directory with a `transformer/` subfolder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist; pass a PocketDiT or pipeline directory")
    if (p / QUANT_CONFIG_NAME).is_file():
        return load_quantized(p)
    for cand in (p, p / "transformer", p / "denoiser"):
        if (cand / "config.json").is_file():
            cfg = read_json(cand / "config.json")
            if isinstance(cfg, dict) and cfg.get("_class_name") == "PocketDiT":
                if (cand / QUANT_CONFIG_NAME).is_file():
                    return load_quantized(cand)
                return _load_float(cand)
    raise FileNotFoundError(
        f"no PocketDiT checkpoint in {p}: expected config.json with _class_name PocketDiT there or in "
        f"{p / 'transformer'}"
    )


def _load_float(d: Path):
    """PocketDiT.from_pretrained of a save_pretrained directory, after checking that its weights are there and
    readable (diffusers would otherwise fall back to unpickling a .bin file and log its attempts)."""
    import importlib.util

    from safetensors import safe_open

    weights = d / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{d} has a PocketDiT config.json but no {weights.name}; the checkpoint is incomplete")
    try:
        with safe_open(str(weights), "pt"):
            pass
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise ValueError(f"cannot read {weights}: {e} (the file is corrupt or truncated)") from None
    # diffusers' default low_cpu_mem_usage needs accelerate and warns loudly without it
    low_cpu = importlib.util.find_spec("accelerate") is not None
    return PocketDiT.from_pretrained(d, low_cpu_mem_usage=low_cpu).eval()
