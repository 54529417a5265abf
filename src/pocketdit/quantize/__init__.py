"""Weight quantization of PocketDiT: k-means palettization (SnapGen++ Supp. C) and torchao CPU schemes.

One verb, one config dataclass per scheme (torchao style):

    report = quantize_(model, PalettizeConfig(nbits=4, target_avg_bits=4.3), calibration=batches)
    quantize_(model, Int8WeightOnly())            # torchao Int8WeightOnlyConfig
    quantize_(model, Int8DynActInt4Weight())      # torchao 8-bit dynamic activations, 4-bit grouped weights
                                                  # (the scheme ExecuTorch's XNNPACK backend runs)

Palettization (the paper's recipe): every Linear/Conv weight becomes a look-up table (LUT) of 2^nbits
values plus one index per weight; per-layer sensitivity on calibration inputs picks the layers kept at
`high_nbits` so that the average stays at or below `target_avg_bits`; by default each Linear layer's
indices are then assigned GPTQ-style; `self_distill_` then fine-tunes the parameters that are not
palettized against the unquantized model; `save_quantized` stores LUTs and bit-packed indices in
safetensors, and `load_quantized` rebuilds the model from them. Files never go through pickle.

Where things live:
    api          quantize_, the scheme configs, config_for_scheme, PalettizationReport, psnr
    palettize    k-means palettization of one weight, GPTQ-style assignment, layer sensitivity and bit choice
    calibration  calibration inputs: the fp32 pipeline's sampling trajectories, or synthetic random ones
    distill      self_distill_ (self-distillation, optionally of LUTs and indices)
    storage      save_quantized / load_quantized (safetensors + JSON), QuantizedPocketDiT, load_denoiser
    cli          the `pocketdit quantize` command
"""

# A pipeline's model_index.json names this package for its quantized transformer
# (["pocketdit.quantize", "QuantizedPocketDiT"]); DiffusionPipeline's loader looks up ModelMixin here by name
# to learn how to load it.
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from .api import (
    SCHEMES, Int8DynActInt4Weight, Int8WeightOnly, PalettizationReport, PalettizeConfig, QuantConfig,
    config_for_scheme, psnr, quantize_,
)
from .calibration import random_calibration, trajectory_calibration
from .distill import self_distill_
from .palettize import (
    SENSITIVITY_METRICS, PalettizedWeight, choose_layer_bits, gptq_palettize, input_second_moments,
    layer_sensitivity, palettizable_layers, palettize_weight, palettized_layers,
)
from .storage import (
    PALETTIZED_WEIGHTS_NAME, QUANT_CONFIG_NAME, TORCHAO_WEIGHTS_NAME, QuantizedPocketDiT, load_denoiser,
    load_quantized, pack_indices, save_quantized, unpack_indices,
)

__all__ = [
    "PalettizeConfig",
    "Int8WeightOnly",
    "Int8DynActInt4Weight",
    "SCHEMES",
    "QuantConfig",
    "config_for_scheme",
    "PalettizedWeight",
    "PalettizationReport",
    "SENSITIVITY_METRICS",
    "palettize_weight",
    "gptq_palettize",
    "input_second_moments",
    "palettizable_layers",
    "palettized_layers",
    "layer_sensitivity",
    "choose_layer_bits",
    "quantize_",
    "self_distill_",
    "random_calibration",
    "trajectory_calibration",
    "pack_indices",
    "unpack_indices",
    "save_quantized",
    "load_quantized",
    "QuantizedPocketDiT",
    "load_denoiser",
    "QUANT_CONFIG_NAME",
    "PALETTIZED_WEIGHTS_NAME",
    "TORCHAO_WEIGHTS_NAME",
    "psnr",
]
