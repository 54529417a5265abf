"""k-means palettization of one weight, GPTQ-style index assignment, and per-layer sensitivity.

Every Linear/Conv weight becomes a look-up table (LUT) of 2^nbits values plus one index per weight. The
k-means itself is coremltools' post-training palettizer; around it, `gptq_palettize` re-assigns a Linear
layer's indices so that its output on calibration inputs, rather than its weight, stays close, and
`layer_sensitivity` with `choose_layer_bits` picks the layers kept at high_nbits within an average bit
budget (SnapGen++ Supp. C). `pocketdit.quantize.quantize_` puts these together.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

SENSITIVITY_METRICS = ("model_output", "relative_mse", "mse")


# ----------------------------------------------------------------------------------------------------
# Palettizing one weight: k-means LUT, nearest or GPTQ-style assignment
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


def palettized_layers(model: nn.Module) -> dict[str, PalettizedWeight]:
    """The PalettizedWeight of every module `quantize_` palettized, by module name."""
    return {n: m.palettized_weight for n, m in model.named_modules() if hasattr(m, "palettized_weight")}


# ----------------------------------------------------------------------------------------------------
# Sensitivity: which layers keep high_nbits
# ----------------------------------------------------------------------------------------------------
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
