"""Weight quantization of PocketDiT: k-means palettization (SnapGen++ Supp. C) and torchao CPU schemes.

One verb, one config dataclass per scheme (torchao style):

    report = quantize_(model, PalettizeConfig(nbits=4, target_avg_bits=4.3), calibration=batches)
    quantize_(model, Int8WeightOnly())            # torchao Int8WeightOnlyConfig
    quantize_(model, Int8DynActInt4Weight())      # torchao 8-bit dynamic activations, 4-bit grouped weights
                                                  # (the scheme ExecuTorch's XNNPACK backend runs)

Palettization (the paper's recipe): every Linear/Conv weight becomes a look-up table (LUT) of 2^nbits
values plus one index per weight. The k-means itself is coremltools' post-training palettizer; this file
adds what the paper needs around it: per-layer sensitivity (output MSE when that layer alone is
palettized, measured on calibration inputs) picks the layers kept at `high_nbits` so that the average
stays at or below `target_avg_bits`; by default each Linear layer's indices are then assigned GPTQ-style
(`gptq_palettize`: rounding errors compensated through the layer's input statistics, so its output
rather than its weight stays close); `self_distill_` then fine-tunes the parameters that are not
palettized (biases, norms, modulation tables) against the unquantized model; `save_quantized` stores
LUTs and bit-packed indices in safetensors, and `load_quantized` rebuilds the model from them.

Files never go through pickle: palettized checkpoints are safetensors + JSON; torchao checkpoints are
flattened with torchao's safetensors support.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.modeling_utils import ModelMixin  # DiffusionPipeline's loader looks for it here by name

__all__ = [
    "PalettizeConfig",
    "Int8WeightOnly",
    "Int8DynActInt4Weight",
    "SCHEMES",
    "config_for_scheme",
    "PalettizedWeight",
    "PalettizationReport",
    "palettize_weight",
    "palettizable_layers",
    "layer_sensitivity",
    "choose_layer_bits",
    "quantize_",
    "self_distill_",
    "random_calibration",
    "save_quantized",
    "load_quantized",
    "QuantizedPocketDiT",
    "load_denoiser",
    "psnr",
]

QUANT_CONFIG_NAME = "quantization_config.json"
PALETTIZED_WEIGHTS_NAME = "palettized.safetensors"
TORCHAO_WEIGHTS_NAME = "torchao.safetensors"


# ----------------------------------------------------------------------------------------------------
# Configs (one per scheme)
# ----------------------------------------------------------------------------------------------------
def _check_fields(cls, values: dict):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}; valid keys: {sorted(known)}")


SENSITIVITY_METRICS = ("model_output", "relative_mse", "mse")


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
# Palettizing one weight
# ----------------------------------------------------------------------------------------------------
@dataclass
class PalettizedWeight:
    """A weight as LUT + indices: weight[g-th group] = lut[g][indices].

    lut: (groups, 2^nbits) float; indices: integer tensor of the weight's shape; groups split dim 0
    (output channels) into equal parts (1 group = per tensor).
    """

    lut: torch.Tensor
    indices: torch.Tensor
    nbits: int

    @property
    def shape(self):
        return tuple(self.indices.shape)

    def dequantize(self) -> torch.Tensor:
        groups = self.lut.shape[0]
        idx = self.indices.long().reshape(groups, -1)
        return torch.gather(self.lut, 1, idx).reshape(self.shape)

    def storage_bits(self, lut_bits: int = 16) -> int:
        """Bits to store: nbits per index plus the LUTs (fp16)."""
        return self.indices.numel() * self.nbits + self.lut.numel() * lut_bits


def _quiet_coremltools():
    """coremltools' k-means logs progress lines at INFO and draws its own bars; keep our output readable."""
    for name in ("coremltools", "coremltools.optimize.torch._utils.k_means"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return contextlib.redirect_stderr(io.StringIO())


def _nearest_entry(weights: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the nearest LUT entry for each weight; weights (groups, n), lut (groups, k), any order."""
    sorted_lut, order = lut.sort(dim=1, stable=True)  # stable: a sorted LUT maps to itself
    position = torch.searchsorted((sorted_lut[:, 1:] + sorted_lut[:, :-1]) / 2, weights.contiguous())
    return torch.gather(order, 1, position)


def palettize_weight(
    weight: torch.Tensor,
    nbits: int,
    granularity: str = "per_tensor",
    group_size: Optional[int] = None,
) -> PalettizedWeight:
    """k-means palettize one weight with coremltools' post-training palettizer; the LUT is rounded to fp16.

    The LUT is rounded to fp16 (the precision Core ML stores it in) before indices are assigned, so the
    eager model, the saved file and every exported graph use exactly the same weights.
    """
    k = 2**nbits
    w = weight.detach().float().cpu()
    if granularity != "per_tensor" and w.shape[0] % group_size:
        granularity, group_size = "per_tensor", None  # channels not a multiple of the group: one LUT
    groups = 1 if granularity == "per_tensor" else w.shape[0] // group_size
    flat = w.reshape(groups, -1)
    index_dtype = torch.uint8 if nbits <= 8 else torch.int32
    if flat.shape[1] <= k:
        # No more weights than LUT entries: the weights are their own palette (lossless).
        lut = torch.zeros(groups, k)
        lut[:, : flat.shape[1]] = flat.half().float()
        idx = torch.arange(flat.shape[1]).expand(groups, -1).reshape(w.shape)
        return PalettizedWeight(lut, idx.to(index_dtype), nbits)
    lut = _coremltools_lut(w, nbits, granularity, group_size).reshape(groups, -1)
    lut, _ = lut.half().float().sort(dim=1)
    idx = _nearest_entry(flat, lut).to(index_dtype)  # nearest fp16 centre per weight
    return PalettizedWeight(lut, idx.reshape(w.shape), nbits)


def _coremltools_lut(w: torch.Tensor, nbits: int, granularity: str, group_size: Optional[int]) -> torch.Tensor:
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

    layer_cfg = {"n_bits": nbits, "granularity": granularity}
    if group_size is not None:
        layer_cfg["group_size"] = group_size
    holder = nn.Module()
    holder.layer = nn.Linear(1, 1, bias=False)
    holder.layer.weight = nn.Parameter(w.reshape(w.shape[0], -1).clone(), requires_grad=False)
    with _quiet_coremltools():
        done = PostTrainingPalettizer(holder, PostTrainingPalettizerConfig.from_dict({"global_config": layer_cfg})).compress()
    return done.layer.state_dict()["_COREML_/weight/lut"].float()


def _run_with_pre_hooks(model: nn.Module, pre_hooks: dict, calibration: Iterable[dict]) -> None:
    """Run the model on every calibration batch with forward pre-hooks {module: fn(module, args)} attached."""
    handles = [module.register_forward_pre_hook(fn) for module, fn in pre_hooks.items()]
    try:
        for batch in calibration:
            model(**batch)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def input_second_moments(model: nn.Module, layers: dict[str, nn.Module], calibration: Iterable[dict]) -> dict[str, torch.Tensor]:
    """E[x x^T] over the inputs each Linear layer in `layers` sees on the calibration batches (fp32).

    A weight change dW changes the layer's output by a mean square of tr(dW H dW^T) / out_features with
    H = E[x x^T]: the quantity GPTQ-style index assignment minimises. Layers that are not Linear, or whose
    forward never runs, are left out. Holds one in_features x in_features fp32 matrix per layer.
    """
    sums = {n: None for n, m in layers.items() if isinstance(m, nn.Linear)}
    rows = dict.fromkeys(sums, 0)

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            h = x.T @ x
            sums[name] = h if sums[name] is None else sums[name] + h
            rows[name] += x.shape[0]

        return fn

    _run_with_pre_hooks(model, {layers[n]: hook(n) for n in sums}, calibration)
    return {n: h / rows[n] for n, h in sums.items() if h is not None}


@torch.no_grad()
def gptq_palettize(
    weight: torch.Tensor, palette: PalettizedWeight, hessian: torch.Tensor, damp: float = 0.01, block_size: int = 128,
    act_order: bool = True,
) -> tuple[PalettizedWeight, torch.Tensor]:
    """Re-assign a palettized Linear weight's indices column by column, GPTQ-style (Frantar et al., 2023).

    Nearest-entry rounding minimises the weight error; this minimises the layer's output error on the
    calibration inputs (H = E[x x^T], `input_second_moments`): each input column is rounded to its nearest
    LUT entry after the rounding errors of the columns before it have been spread over it through the
    inverse Hessian. The LUT is kept. Returns the new palette and the error-compensated float weight whose
    nearest LUT entries are exactly the new indices (quantization-aware fine-tuning starts from it). If the
    result has a larger output error than nearest rounding (ill-conditioned H), the input palette is
    returned with the original weight.
    """
    original = weight.detach().float().reshape(weight.shape[0], -1)
    w = original.clone()
    groups = palette.lut.shape[0]
    rows_per_group = w.shape[0] // groups
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # an input that is always zero here: its column is decoupled and keeps nearest rounding
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0])
    # columns with the largest inputs first: their errors are then spread over the most columns
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(h.shape[0])
    w, h = w[:, order], h[order][:, order]
    # upper Cholesky factor of H^-1: row i holds how column i's error propagates to columns > i
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    indices = torch.empty(w.shape, dtype=torch.long)
    compensated = torch.empty_like(w)
    for start in range(0, w.shape[1], block_size):
        end = min(start + block_size, w.shape[1])
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        hb = hinv[start:end, start:end]
        for i in range(end - start):
            column = block[:, i]
            compensated[:, start + i] = column
            idx = _nearest_entry(column.reshape(groups, rows_per_group), palette.lut).reshape(-1)
            indices[:, start + i] = idx
            q = torch.gather(palette.lut, 1, idx.reshape(groups, rows_per_group)).reshape(-1)
            err = (column - q) / hb[i, i]
            block[:, i:] -= err[:, None] * hb[i, i:][None]
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    inverse = torch.argsort(order)
    indices, compensated = indices[:, inverse], compensated[:, inverse]
    new = PalettizedWeight(palette.lut.clone(), indices.reshape(palette.shape).to(palette.indices.dtype), palette.nbits)
    hessian = hessian.float()

    def output_error(q):
        d = original - q.reshape(original.shape)
        return torch.einsum("ij,jk,ik->", d, hessian, d).item()

    if output_error(new.dequantize()) > output_error(palette.dequantize()):
        return palette, original.clone().reshape(weight.shape)
    return new, compensated.reshape(weight.shape)


def palettizable_layers(model: nn.Module, skip: Sequence[str] = ()) -> dict[str, nn.Module]:
    """Every Linear and Conv module by name, except names containing one of `skip`."""
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and not any(s in name for s in skip)
    }


# ----------------------------------------------------------------------------------------------------
# Calibration inputs and sensitivity
# ----------------------------------------------------------------------------------------------------
def random_calibration(
    model, num_batches: int = 4, batch_size: int = 2, latent_size: Optional[int] = None, text_length: int = 16, seed: int = 0
) -> list[dict]:
    """Synthetic denoiser inputs: x_t from Gaussian "images" and noise at uniform t, Gaussian text states.

    A stand-in when no data is at hand; calibrate on real latents and prompt embeddings when you have them
    (pass any list of model keyword dicts as `calibration`).
    """
    cfg = model.config
    size = latent_size or 4 * model.latent_multiple
    while not model.is_valid_latent_size(size, size):
        size += model.latent_multiple
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        t = torch.rand(batch_size, generator=g)
        x0 = torch.randn(batch_size, cfg.in_channels, size, size, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        states = [torch.randn(batch_size, text_length, d, generator=g) for d in cfg.text_embed_dims]
        masks = []
        for _ in cfg.text_embed_dims:
            lengths = torch.randint(1, text_length + 1, (batch_size,), generator=g)
            masks.append(torch.arange(text_length)[None] < lengths[:, None])
        one = len(states) == 1
        batches.append(
            dict(
                hidden_states=x, timestep=t, encoder_hidden_states=states[0] if one else states,
                encoder_attention_mask=masks[0] if one else masks,
            )
        )
    return batches


def _layer_output(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, module.bias)
    conv = F.conv1d if isinstance(module, nn.Conv1d) else F.conv2d
    return conv(x, weight, module.bias, module.stride, module.padding, module.dilation, module.groups)


@torch.no_grad()
def _capture_inputs(model, layers: dict, calibration: Iterable[dict], max_rows: int = 4096) -> dict[str, list]:
    """Inputs each layer sees on the calibration batches (Linear rows subsampled to `max_rows`)."""
    seen = {name: [] for name in layers}
    g = torch.Generator().manual_seed(0)

    def hook(name):
        def fn(module, args):
            x = args[0].detach()
            if isinstance(module, nn.Linear):
                x = x.reshape(-1, x.shape[-1])
                if x.shape[0] > max_rows:
                    x = x[torch.randperm(x.shape[0], generator=g)[:max_rows]]
            seen[name].append(x)

        return fn

    _run_with_pre_hooks(model, {m: hook(n) for n, m in layers.items()}, calibration)
    return seen


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    calibration: Iterable[dict],
    palettes: dict[str, PalettizedWeight],
    metric: str = "model_output",
    progress: bool = False,
) -> dict[str, float]:
    """Per layer: the error caused by palettizing that layer alone (paper Supp. C), on the calibration inputs.

    "model_output": MSE of the model's output with only this layer palettized, divided by the output's
    mean square — what the layer's quantization costs downstream, so layers at the ends of the network
    (patch embedding, final projection, timestep MLP) that a local score underrates show up. One forward
    pass per layer and batch.

    "relative_mse" / "mse" (the paper's): MSE between the layer's own output with the palettized weight and
    with its own weight, on the inputs it sees in the unquantized model; "relative_mse" divides by the mean
    square of the unquantized output so layers of different scale compare fairly. A layer whose forward is
    never called (its weight used directly) is scored by the error of its weight instead.
    """
    if metric not in SENSITIVITY_METRICS:
        raise ValueError(f"metric must be one of {SENSITIVITY_METRICS}, got {metric!r}")
    layers = {n: m for n, m in palettizable_layers(model).items() if n in palettes}
    calibration = list(calibration)
    from tqdm.auto import tqdm

    if metric == "model_output":
        refs = [model(**b).sample for b in calibration]
        ref_sq = sum(r.double().pow(2).sum().item() for r in refs)
        out = {}
        for name, module in tqdm(layers.items(), desc="sensitivity", disable=not progress, leave=False):
            original = module.weight.data.clone()
            module.weight.data.copy_(palettes[name].dequantize().to(original.dtype))
            try:
                err = sum((model(**b).sample - r).double().pow(2).sum().item() for b, r in zip(calibration, refs))
            finally:
                module.weight.data.copy_(original)
            out[name] = err / max(ref_sq, 1e-30)
        return out

    inputs = _capture_inputs(model, layers, calibration)
    out = {}
    for name, module in layers.items():
        wq = palettes[name].dequantize().to(module.weight.dtype)
        err = ref_sq = 0.0
        count = 0
        for x in inputs[name]:
            ref = _layer_output(module, x, module.weight)
            diff = _layer_output(module, x, wq) - ref
            err += diff.double().pow(2).sum().item()
            ref_sq += ref.double().pow(2).sum().item()
            count += ref.numel()
        if count == 0:
            # The module's weight is used but not its forward (e.g. KV compression applies its conv weights
            # as a weighted sum): fall back to the weight-space error, the output error under white inputs.
            diff = (wq - module.weight).double()
            err, ref_sq, count = diff.pow(2).sum().item(), module.weight.double().pow(2).sum().item(), diff.numel()
        out[name] = err / max(ref_sq, 1e-30) if metric == "relative_mse" else err / count
    return out


def choose_layer_bits(
    sensitivity: dict[str, float],
    numels: dict[str, int],
    nbits: int,
    high_nbits: int,
    target_avg_bits: float,
    per_bit: bool = False,
) -> dict[str, int]:
    """Promote sensitive layers to high_nbits while the weighted average stays <= target.

    per_bit=False: in order of sensitivity (the paper's rule). per_bit=True: in order of sensitivity per
    weight, i.e. error removed per extra bit spent — the better greedy when sensitivities add up (model-output
    errors), since one large layer can otherwise use the budget of many small, more damaging ones.
    """
    total = sum(numels.values())
    bits = {n: nbits for n in numels}
    budget = target_avg_bits * total - nbits * total  # extra bits we may spend
    key = (lambda n: sensitivity[n] / numels[n]) if per_bit else sensitivity.get
    for name in sorted(sensitivity, key=key, reverse=True):
        extra = (high_nbits - nbits) * numels[name]
        if extra <= budget + 1e-9:
            bits[name] = high_nbits
            budget -= extra
    return bits


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


def palettized_layers(model: nn.Module) -> dict[str, PalettizedWeight]:
    return {n: m.palettized_weight for n, m in model.named_modules() if hasattr(m, "palettized_weight")}


def _guided(velocity: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on a batch stacked as [conditional; unconditional]."""
    from .flow import classifier_free_guidance

    return classifier_free_guidance(*velocity.chunk(2), scale)


def self_distill_(
    student: nn.Module,
    teacher: nn.Module,
    calibration: Sequence[dict],
    steps: int = 200,
    lr: float = 1e-4,
    train_luts: bool = False,
    train_indices: bool = False,
    guidance_scale: Optional[float] = None,
    progress: bool = True,
) -> list[float]:
    """Fine-tune the palettized student to match the unquantized teacher's velocity (paper Supp. C).

    Biases, norms, modulation tables and any layer left in float are trained with MSE to the teacher on the
    calibration batches. Palettized weights keep their indices; with train_luts=False (the paper's recipe)
    they are frozen, with train_luts=True their LUT entries are trained too (each weight is lut[index], so
    the gradient of an entry is the sum over the weights that use it) and rounded to fp16 at the end; the
    model stays a valid palettized model with the same number of values per layer. train_indices=True
    (implies train_luts) is quantization-aware training: each palettized layer keeps a latent float weight
    (initialised from GPTQ's compensated weight `palettized_latent` if quantize_ left one, else from the
    teacher's), every step assigns it to its nearest LUT entry and the gradient passes straight through
    the rounding to the latent weight, so weights can change entry; at the end the indices are the nearest
    fp16 entries. guidance_scale=w: each calibration batch stacks a conditional first half
    and an unconditional second half on the same latents (`trajectory_calibration`'s batches), and the loss
    adds the error of the guided velocity v_u + w (v_c - v_u) that the sampler integrates, which weighs
    the two branches' errors as sampling does. Returns the loss per step.
    """
    from torch.func import functional_call

    layers = {n: m for n, m in student.named_modules() if hasattr(m, "palettized_weight")}
    palettized = {id(m.weight) for m in layers.values()}
    trainable = [p for p in student.parameters() if id(p) not in palettized]
    luts, latents = {}, {}
    if train_luts or train_indices:
        luts = {n: nn.Parameter(m.palettized_weight.lut.clone()) for n, m in layers.items()}
    if train_indices:
        teacher_params = dict(teacher.named_parameters())
        for n, m in layers.items():
            w = getattr(m, "palettized_latent", None)  # GPTQ assignment's compensated weight, if any
            if w is None:
                w = teacher_params.get(f"{n}.weight")
                w = w if w is not None and w.shape == m.weight.shape else m.weight
            latents[n] = nn.Parameter(w.detach().float().clone())
    if not trainable and not luts:
        raise ValueError("nothing to fine-tune: every parameter is palettized (pass train_luts=True)")
    flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) not in palettized)
    teacher.eval()
    with torch.no_grad():
        targets = [teacher(**b).sample for b in calibration]
    index_views = {n: m.palettized_weight.indices.long().reshape(m.palettized_weight.lut.shape[0], -1) for n, m in layers.items()}

    def weights_from_luts():
        weights = {}
        for n, lut in luts.items():
            if n in latents:
                latent = latents[n].reshape(lut.shape[0], -1)
                index_views[n] = _nearest_entry(latent.detach(), lut.detach())
                # straight-through: forward uses lut[index], backward reaches both the LUT and the latent
                w = torch.gather(lut, 1, index_views[n]) + (latent - latent.detach())
            else:
                w = torch.gather(lut, 1, index_views[n])
            weights[f"{n}.weight"] = w.reshape(layers[n].weight.shape).to(layers[n].weight.dtype)
        return weights

    opt = torch.optim.AdamW(trainable + list(luts.values()) + list(latents.values()), lr=lr, weight_decay=0.0)
    # cosine decay to zero: the last steps settle instead of oscillating around the fp32 targets
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / steps)))
    losses = []
    from tqdm.auto import tqdm

    was_training = student.training
    student.train()
    bar = tqdm(range(steps), desc="self-distillation", disable=not progress, leave=False)
    try:
        order = []
        shuffle = torch.Generator().manual_seed(0)
        for step in bar:
            if not order:  # a fresh shuffled pass: trajectory batches come ordered by time step
                order = torch.randperm(len(calibration), generator=shuffle).tolist()
            i = order.pop()
            if luts:
                out = functional_call(student, weights_from_luts(), args=(), kwargs=calibration[i], strict=False)
            else:
                out = student(**calibration[i])
            loss = F.mse_loss(out.sample, targets[i])
            if guidance_scale is not None:
                loss = loss + F.mse_loss(_guided(out.sample, guidance_scale), _guided(targets[i], guidance_scale))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3g}")
    finally:
        student.train(was_training)
        for p in student.parameters():
            p.requires_grad_(flags[id(p)])
        with torch.no_grad():  # fp16 LUTs (what every runtime stores), and the dense weights to match
            for n, lut in luts.items():
                pw = layers[n].palettized_weight
                pw.lut = lut.detach().half().float()
                if n in latents:
                    pw.lut, _ = pw.lut.sort(dim=1)
                    idx = _nearest_entry(latents[n].detach().reshape(pw.lut.shape[0], -1), pw.lut)
                    pw.indices = idx.reshape(pw.indices.shape).to(pw.indices.dtype)
                layers[n].weight.data.copy_(pw.dequantize().to(layers[n].weight.dtype))
                if n in latents:  # a later call continues from here
                    layers[n].palettized_latent = latents[n].detach().clone()
    return losses


# ----------------------------------------------------------------------------------------------------
# Storage
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

    from .model import PocketDiT

    d = Path(directory)
    qpath = d / QUANT_CONFIG_NAME
    if not qpath.is_file():
        raise FileNotFoundError(f"{qpath} not found: {d} is not a quantized checkpoint (make one with `pocketdit quantize`)")
    meta = json.loads(qpath.read_text())
    wpath = d / meta.get("weights", "")
    if not wpath.is_file():
        raise FileNotFoundError(f"{wpath} not found; the quantized checkpoint in {d} is incomplete")
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
    from .model import PocketDiT

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist; pass a PocketDiT or pipeline directory")
    if (p / QUANT_CONFIG_NAME).is_file():
        return load_quantized(p)
    for cand in (p, p / "transformer", p / "denoiser"):
        if (cand / "config.json").is_file():
            cfg = json.loads((cand / "config.json").read_text())
            if cfg.get("_class_name") == "PocketDiT":
                if (cand / QUANT_CONFIG_NAME).is_file():
                    return load_quantized(cand)
                return PocketDiT.from_pretrained(cand).eval()
    raise FileNotFoundError(
        f"no PocketDiT checkpoint in {p}: expected config.json with _class_name PocketDiT there or in "
        f"{p / 'transformer'}"
    )


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
