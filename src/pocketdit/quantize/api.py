"""The quantization API: one verb, `quantize_`, and one config dataclass per scheme (torchao style).

    report = quantize_(model, PalettizeConfig(nbits=4, target_avg_bits=4.3), calibration=batches)
    quantize_(model, Int8WeightOnly())            # torchao Int8WeightOnlyConfig
    quantize_(model, Int8DynActInt4Weight())      # torchao 8-bit dynamic activations, 4-bit grouped weights
                                                  # (the scheme ExecuTorch's XNNPACK backend runs)

Palettization k-means palettizes every Linear/Conv layer (`pocketdit.quantize.palettize`), keeps the most
sensitive layers at high_nbits within target_avg_bits and by default assigns Linear layers' indices
GPTQ-style; the torchao schemes are torchao's own `quantize_`. `psnr` measures the result against the float
model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from .palettize import (
    SENSITIVITY_METRICS,
    choose_layer_bits,
    gptq_palettize,
    input_second_moments,
    layer_sensitivity,
    palettizable_layers,
    palettize_weight,
)


# ----------------------------------------------------------------------------------------------------
# Configs (one per scheme)
# ----------------------------------------------------------------------------------------------------
def _check_fields(cls, values: dict):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(known)}")


@dataclass
class PalettizeConfig:
    """k-means weight palettization of every Linear and Conv layer.

    nbits: bits of most layers (2^nbits LUT entries). high_nbits: bits of the sensitive layers.
    target_avg_bits: the average bits per weight to stay within; layers are moved to high_nbits in order of
        sensitivity while the average allows (= nbits: no layer is promoted, no calibration needed).
    granularity: "per_tensor" (one LUT per weight, the paper's) or "per_grouped_channel" (one LUT per
        `group_size` output channels; a layer whose output channels are not a multiple gets one LUT).
    sensitivity: how a layer's damage is scored when it alone is palettized to nbits.
        "model_output": relative MSE of the whole model's output (velocity) on the calibration inputs; the
            errors of different layers then add up, so layers are promoted in order of error removed per
            extra bit (a knapsack greedy). One forward pass per layer and calibration batch.
        "relative_mse": the paper's: MSE of the layer's own output / its mean square, layers promoted in
            order of that score. "mse": the same without the normalisation.
    assignment: how weights are mapped to LUT entries. "nearest": each weight to its nearest entry (the
        weight error is smallest). "gptq": Linear layers' indices chosen column by column so that the
        layer's output on the calibration inputs changes least (`gptq_palettize`); needs calibration, and
        layers are then ranked for high_nbits as they will be assigned.
    skip: substrings of module names to leave in floating point.
    """

    nbits: int = 4
    high_nbits: int = 8
    target_avg_bits: float = 4.3
    granularity: str = "per_tensor"
    group_size: Optional[int] = None
    sensitivity: str = "model_output"
    assignment: str = "gptq"
    skip: tuple = ()

    def __post_init__(self):
        if self.nbits not in (1, 2, 3, 4, 6, 8) or self.high_nbits not in (1, 2, 3, 4, 6, 8):
            raise ValueError(f"nbits and high_nbits must be one of 1, 2, 3, 4, 6, 8; got {self.nbits}, {self.high_nbits}")
        if self.high_nbits < self.nbits:
            raise ValueError(f"high_nbits ({self.high_nbits}) must be >= nbits ({self.nbits})")
        if not self.nbits <= self.target_avg_bits <= self.high_nbits:
            raise ValueError(
                f"target_avg_bits={self.target_avg_bits} must lie between nbits={self.nbits} and high_nbits={self.high_nbits}"
            )
        if self.granularity not in ("per_tensor", "per_grouped_channel"):
            raise ValueError(f"granularity must be 'per_tensor' or 'per_grouped_channel', got {self.granularity!r}")
        if (self.granularity == "per_grouped_channel") != (self.group_size is not None):
            raise ValueError("group_size is required with granularity='per_grouped_channel' and only then")
        if self.sensitivity not in SENSITIVITY_METRICS:
            raise ValueError(f"sensitivity must be one of {SENSITIVITY_METRICS}, got {self.sensitivity!r}")
        if self.assignment not in ("nearest", "gptq"):
            raise ValueError(f"assignment must be 'nearest' or 'gptq', got {self.assignment!r}")
        self.skip = tuple(self.skip)


@dataclass
class Int8WeightOnly:
    """torchao int8 weight-only (per-channel symmetric) on every Linear; activations stay float."""


@dataclass
class Int8DynActInt4Weight:
    """torchao 8-bit dynamic per-token activations + 4-bit grouped symmetric weights on every Linear.

    This is the pattern ExecuTorch's XNNPACK backend lowers to its int4 kernels.
    """

    group_size: int = 32

    def __post_init__(self):
        if self.group_size < 1 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two, got {self.group_size}")


SCHEMES = {"palettize4": PalettizeConfig, "int8": Int8WeightOnly, "8da4w": Int8DynActInt4Weight}
QuantConfig = Union[PalettizeConfig, Int8WeightOnly, Int8DynActInt4Weight]


def config_for_scheme(scheme: str, **overrides) -> QuantConfig:
    """The config of a CLI scheme name ("palettize4", "int8", "8da4w"); keyword arguments set fields."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {sorted(SCHEMES)}")
    cls = SCHEMES[scheme]
    _check_fields(cls, overrides)
    return cls(**overrides)


def _scheme_name(config: QuantConfig) -> str:
    for name, cls in SCHEMES.items():
        if type(config) is cls:
            return name
    raise TypeError(f"not a quantization config: {config!r}")


def _torchao_config(config):
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, Int8WeightOnlyConfig, PerGroup

    if isinstance(config, Int8WeightOnly):
        return Int8WeightOnlyConfig()
    return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(config.group_size))


# ----------------------------------------------------------------------------------------------------
# The verb
# ----------------------------------------------------------------------------------------------------
@dataclass
class PalettizationReport:
    """What palettization did: bits and sensitivity per layer, the weighted average, storage."""

    layer_bits: dict = field(default_factory=dict)
    sensitivity: dict = field(default_factory=dict)
    numels: dict = field(default_factory=dict)

    @property
    def average_bits(self) -> float:
        total = sum(self.numels.values())
        return sum(self.layer_bits[n] * self.numels[n] for n in self.numels) / max(total, 1)

    @property
    def num_high_bit_layers(self) -> int:
        return sum(1 for b in self.layer_bits.values() if b > min(self.layer_bits.values(), default=0))

    def to_dict(self) -> dict:
        return dict(
            average_bits=self.average_bits, layer_bits=self.layer_bits, sensitivity=self.sensitivity, numels=self.numels
        )


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    calibration: Optional[Iterable[dict]] = None,
    progress: bool = True,
    sensitivity_batches: Optional[int] = None,
):
    """Quantize `model` in place with `config`; returns a PalettizationReport for palettization, else None.

    Palettization needs `calibration` (a list of model keyword-argument dicts) to rank layers when
    target_avg_bits > nbits and for GPTQ assignment; `random_calibration(model)` is a synthetic stand-in.
    GPTQ's input statistics use every batch (one forward pass each); ranking the layers costs a forward
    pass per layer and batch, so `sensitivity_batches` caps it to that many evenly spaced batches.
    """
    if isinstance(config, (Int8WeightOnly, Int8DynActInt4Weight)):
        from torchao.quantization import quantize_ as ao_quantize_

        ao_quantize_(model, _torchao_config(config))
        model._pocketdit_quantization = {"scheme": _scheme_name(config), "config": asdict(config)}
        return None
    if not isinstance(config, PalettizeConfig):
        raise TypeError(f"quantize_ takes PalettizeConfig, Int8WeightOnly or Int8DynActInt4Weight, got {type(config).__name__}")

    layers = palettizable_layers(model, config.skip)
    if not layers:
        raise ValueError("the model has no Linear or Conv layers to palettize")
    from tqdm.auto import tqdm

    needs_calibration = config.target_avg_bits > config.nbits or config.assignment == "gptq"
    if needs_calibration and calibration is None:
        raise ValueError(
            "palettization with target_avg_bits > nbits or assignment='gptq' needs calibration inputs; pass "
            "calibration=... (e.g. pocketdit.quantize.random_calibration(model)), or set target_avg_bits=nbits and "
            "assignment='nearest'"
        )
    calibration = list(calibration) if calibration is not None else None
    if sensitivity_batches is not None and sensitivity_batches < 1:
        raise ValueError(f"sensitivity_batches must be at least 1, got {sensitivity_batches}")
    ranking = calibration
    if calibration is not None and sensitivity_batches is not None and len(calibration) > sensitivity_batches:
        # evenly spaced: trajectory batches come ordered by prompt chunk and time step
        every = len(calibration) / sensitivity_batches
        ranking = [calibration[int(i * every)] for i in range(sensitivity_batches)]
    # all batches: a subset of a trajectory's batches sees only a few of its time steps
    hessians = input_second_moments(model, layers, calibration) if config.assignment == "gptq" else {}
    latents = {}

    def palettize_all(names, nbits, desc):
        palettes = {}
        for n in tqdm(names, desc=desc, disable=not progress, leave=False):
            palettes[n] = palettize_weight(layers[n].weight, nbits, config.granularity, config.group_size)
            if n in hessians:
                palettes[n], latents[(n, nbits)] = gptq_palettize(layers[n].weight, palettes[n], hessians[n])
        return palettes

    low = palettize_all(list(layers), config.nbits, f"k-means {config.nbits}-bit")
    numels = {n: m.weight.numel() for n, m in layers.items()}
    sensitivity = {}
    bits = {n: config.nbits for n in layers}
    if config.target_avg_bits > config.nbits:
        sensitivity = layer_sensitivity(model, ranking, low, config.sensitivity, progress=progress)
        bits = choose_layer_bits(
            sensitivity, numels, config.nbits, config.high_nbits, config.target_avg_bits,
            per_bit=config.sensitivity == "model_output",
        )
    high = palettize_all([n for n, b in bits.items() if b != config.nbits], config.high_nbits, f"k-means {config.high_nbits}-bit")
    palettes = {**low, **high}
    for name, module in layers.items():
        pw = palettes[name]
        module.weight.data.copy_(pw.dequantize().to(module.weight.dtype))
        module.palettized_weight = pw  # plain attribute: kept for saving/export, not part of state_dict
        if (name, bits[name]) in latents:  # where quantization-aware fine-tuning starts (`self_distill_`)
            module.palettized_latent = latents[(name, bits[name])]
    report = PalettizationReport(layer_bits=bits, sensitivity=sensitivity, numels=numels)
    model._pocketdit_quantization = {"scheme": "palettize4", "config": asdict(config), "report": report.to_dict()}
    return report


# ----------------------------------------------------------------------------------------------------
# Quality
# ----------------------------------------------------------------------------------------------------
def psnr(test: torch.Tensor, reference: torch.Tensor, peak: Optional[float] = None) -> float:
    """PSNR in dB of `test` against `reference`; peak = the reference's value range unless given
    (2.0 for images in [-1, 1]). Identical tensors give +inf."""
    ref = reference.detach().double()
    mse = (test.detach().double() - ref).pow(2).mean().item()
    if peak is None:
        peak = (ref.max() - ref.min()).item() or 1.0
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)
