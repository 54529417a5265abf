"""Width-elastic PocketDiT (SnapGen++ section 4): one set of weights, several widths.

A PocketDiT built with ``elastic_widths=(0.375, 0.5, 1.0)`` is a *supernet*. ``model.set_width(0.5)`` (or
``with model.at_width(0.5): ...``) makes every layer compute with the leading slice of its weights, as
Once-for-All's ``DynamicLinear`` and slimmable networks do: ``F.linear(x, W[:out, :in])``, never a mask over
a full-width computation, so a width costs what its standalone model costs. ``model.extract_width(0.5)``
copies those slices into a plain PocketDiT of that width (OFA's ``get_active_subnet``).

What a width ``w`` of a model of hidden size ``d`` keeps:

- hidden size ``w d``; query heads ``w H`` and KV heads ``w K`` (whole KV groups, so query head ``i`` still
  reads KV head ``i // (H / K)``); ``head_dim`` never changes; FFN inner width ``round(w d * ratio)``;
- cross-attention K/V read the text and are not sliced (the paper's rule): its query projection slices its
  input columns and its output projection its rows, around the fixed inner width;
- grouped layouts are sliced per group, not as one prefix: the timestep projection ``Linear(d -> 6d)`` viewed
  as (6, d), TokenMerge's input and TokenSplit's output ordered (2, 2, d), the U-ViT skip projections over
  ``cat([x, skip])`` (2, d);
- parameters tied to one width are private to it (the paper): each block's and the final layer's
  modulation table and the cross-attention LayerNorm's affine. Width ``w`` < 1 has its own copies (named
  ``...scale_shift_tables.0_5`` and so on), initialised from the slice of the full-width ones.

Everything here works on a model's structure by name, so it imports nothing from ``model.py`` (which calls
``make_elastic`` for a model built with ``elastic_widths``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention.functional import is_exporting

__all__ = [
    "WidthSizes",
    "SlicedLinear",
    "SlicedLayerNorm",
    "SlicedConv2d",
    "width_key",
    "width_sizes",
    "check_widths",
    "sub_config",
    "make_elastic",
    "init_private_from_full",
    "set_width",
    "at_width",
    "extract_width",
    "check_selectable",
    "select_width",
    "format_widths",
    "sliced_state_dict",
]

FIXED = "fixed"


def format_widths(widths: Sequence[float]) -> str:
    """0.375, 0.5, 1 (how errors and messages list widths)."""
    return ", ".join(f"{float(w):g}" for w in widths)


def width_key(width: float) -> str:
    """The name a width's private parameters are stored under: 0.375 -> "0_375" (module names cannot hold ".")."""
    return f"{float(width):g}".replace(".", "_")


@dataclass(frozen=True)
class WidthSizes:
    """The sizes of one width of a model. ``size(kind, full)`` is what a dimension of kind ``kind`` keeps."""

    width: float
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    def size(self, kind, full: int) -> int:
        if kind == FIXED:
            return full
        if kind == "d":
            return self.hidden
        if kind == "q":
            return self.heads * self.head_dim
        if kind == "kv":
            return self.kv_heads * self.head_dim
        if kind == "heads":
            return self.heads
        if isinstance(kind, tuple) and kind[0] == "ffn":  # ("ffn", mlp_ratio): as PocketDiTBlock sizes it
            return int(round(self.hidden * kind[1]))
        raise ValueError(f"unknown width-dependent dimension kind {kind!r}")


def width_sizes(config, width: float) -> WidthSizes:
    """The sizes of ``width`` (a fraction of the full width) for a PocketDiT config; a clear error if that width
    cannot be cut: hidden size, query heads and KV heads must all come out whole, with the same group size."""
    d, h, kv, hd = config["hidden_size"], config["num_heads"], config["num_kv_heads"], config["head_dim"]
    w = float(width)
    if not (0 < w <= 1) or not math.isfinite(w):
        raise ValueError(f"width {width!r} must be in (0, 1]")
    hidden, heads, kv_heads = w * d, w * h, w * kv
    whole = all(abs(x - round(x)) < 1e-6 for x in (hidden, heads, kv_heads))
    if not whole or round(kv_heads) < 1:
        raise ValueError(
            f"width {w:g} of a model with hidden size {d}, {h} heads of {hd} and {kv} KV heads gives hidden "
            f"{hidden:g}, {heads:g} heads and {kv_heads:g} KV heads; all three must be whole numbers (head_dim is "
            f"fixed and whole KV groups of {h // kv} query heads are kept). Widths that work here: "
            f"{format_widths(valid_widths(config))}"
        )
    return WidthSizes(w, int(round(hidden)), int(round(heads)), int(round(kv_heads)), hd)


def valid_widths(config) -> list[float]:
    """Every width of this config that keeps whole KV groups: multiples of 1 / num_kv_heads."""
    kv = config["num_kv_heads"]
    return [k / kv for k in range(1, kv + 1)]


def check_widths(config, widths: Sequence[float]) -> tuple[float, ...]:
    """Sorted, validated widths; the full width 1.0 must be one of them (it is the supernet itself)."""
    ws = sorted({float(w) for w in widths})
    if not ws:
        raise ValueError("elastic_widths must list at least one width")
    for w in ws:
        width_sizes(config, w)
    if ws[-1] != 1.0:
        raise ValueError(f"elastic_widths {ws} must include 1.0 (the full width is the supernet itself)")
    keys = [width_key(w) for w in ws]
    if len(set(keys)) != len(keys):
        raise ValueError(f"elastic_widths {ws} has two widths with the same name {keys}")
    return tuple(ws)


def sub_config(config, width: float) -> dict:
    """The config of the standalone PocketDiT that width ``width`` of a supernet is."""
    s = width_sizes(config, width)
    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    cfg.update(hidden_size=s.hidden, num_heads=s.heads, num_kv_heads=s.kv_heads, elastic_widths=None)
    return cfg


# ----------------------------------------------------------------------------------------------------
# Slicing
# ----------------------------------------------------------------------------------------------------
# A layout says, per leading dimension of a parameter, (groups, kind): the dimension is `groups` blocks of
# equal size, each keeping its first `sizes.size(kind, block)` entries. Dimensions past the layout are kept.
D = (1, "d")
KEEP = (1, FIXED)


def slice_param(t: torch.Tensor, layout: Sequence[tuple], sizes: Optional[WidthSizes]) -> torch.Tensor:
    """The part of ``t`` that width ``sizes`` uses (``t`` itself at full width). A plain prefix is a view; a
    grouped dimension is a view, a slice and a reshape (a copy), all of which export as static shapes."""
    if sizes is None:
        return t
    view, index, out = [], [], []
    for n, (groups, kind) in zip(t.shape, layout):
        block = n // groups
        keep = sizes.size(kind, block)
        if groups == 1:
            view.append(n)
            index.append(slice(0, keep))
        else:
            view += [groups, block]
            index += [slice(None), slice(0, keep)]
        out.append(groups * keep)
    rest = list(t.shape[len(layout):])
    sliced = t.view(view + rest)[tuple(index)]
    return sliced.reshape(out + rest) if len(view) != len(out) else sliced


class SlicedLinear(nn.Linear):
    """nn.Linear whose active width reads the leading slice of its weight (``weight_layout`` over (out, in))."""

    active: Optional[WidthSizes] = None

    @classmethod
    def wrap(cls, linear: nn.Linear, weight_layout, bias_layout) -> "SlicedLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias  # the same Parameters: nothing is copied
        new.weight_layout, new.bias_layout = tuple(weight_layout), tuple(bias_layout)
        return new

    def active_params(self):
        if self.active is None:
            return self.weight, self.bias
        # Without gradients (sampling, benchmarks), keep the last width's contiguous slices: a grouped slice is a
        # copy, and re-cutting every layer at every step would cost a narrow width a few percent. The key holds
        # the storage and the version counter, so an optimizer step or load_state_dict invalidates it; never
        # while exporting (the graph must read the parameters, not baked constants).
        cacheable = not torch.is_grad_enabled() and not is_exporting()
        if cacheable:
            key = (self.active, self.weight.data_ptr(), self.weight._version,
                   None if self.bias is None else (self.bias.data_ptr(), self.bias._version))
            hit = self.__dict__.get("_slice_cache")
            if hit is not None and hit[0] == key:
                return hit[1]
        w = slice_param(self.weight, self.weight_layout, self.active)
        b = None if self.bias is None else slice_param(self.bias, self.bias_layout, self.active)
        if cacheable:
            w, b = w.contiguous(), None if b is None else b.contiguous()
            self.__dict__["_slice_cache"] = (key, (w, b))
        return w, b

    def forward(self, x):
        return F.linear(x, *self.active_params())

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.active is None else f", active width {self.active.width:g}")


class SlicedConv2d(nn.Conv2d):
    """The patch embedding's conv: a narrower width keeps its first output channels."""

    active: Optional[WidthSizes] = None

    @classmethod
    def wrap(cls, conv: nn.Conv2d) -> "SlicedConv2d":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice"):
            setattr(new, attr, getattr(conv, attr))
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def forward(self, x):
        w = slice_param(self.weight, (D,), self.active)
        b = None if self.bias is None else slice_param(self.bias, (D,), self.active)
        return self._conv_forward(x, w, b)


class SlicedLayerNorm(nn.LayerNorm):
    """LayerNorm over the hidden size; with an affine, each narrower width has its own (private) weight and bias."""

    active: Optional[WidthSizes] = None

    @classmethod
    def wrap(cls, norm: nn.LayerNorm, widths: Sequence[float]) -> "SlicedLayerNorm":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape, new.eps, new.elementwise_affine = norm.normalized_shape, norm.eps, norm.elementwise_affine
        new.weight, new.bias = norm.weight, norm.bias
        if norm.weight is not None:
            d = norm.normalized_shape[0]
            keys = {width_key(w): int(round(w * d)) for w in widths if w < 1}
            new.width_weight = nn.ParameterDict({k: nn.Parameter(norm.weight.detach()[:n].clone()) for k, n in keys.items()})
            new.width_bias = nn.ParameterDict(
                {k: nn.Parameter(norm.bias.detach()[:n].clone()) for k, n in keys.items()} if norm.bias is not None else {}
            )
        return new

    def active_params(self):
        if self.active is None or self.weight is None:
            return self.weight, self.bias
        key = width_key(self.active.width)
        return self.width_weight[key], (self.width_bias[key] if self.bias is not None else None)

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], *self.active_params(), self.eps)


# ----------------------------------------------------------------------------------------------------
# Turning a PocketDiT into a supernet
# ----------------------------------------------------------------------------------------------------
def _linear_layouts(model) -> dict[str, tuple]:
    """Module path -> (weight layout, bias layout) for every Linear whose shape depends on the width."""
    cfg = model.config
    L = {
        "t_embedder.mlp.0": ((D, KEEP), (D,)),
        "t_embedder.mlp.2": ((D, D), (D,)),
        "t_block.1": (((6, "d"), D), ((6, "d"),)),  # the six modulation vectors, each d wide
        "merge.proj": ((D, (4, "d")), (D,)),  # input is the 2x2 window's four tokens, each d wide
        "split.proj": (((4, "d"), D), ((4, "d"),)),
        "final_layer.linear": ((KEEP, D), (KEEP,)),
    }
    for j in range(len(model.skip_projections)):
        L[f"skip_projections.{j}"] = ((D, (2, "d")), (D,))  # over cat([x, skip])
    stages = (("down_blocks", cfg["mlp_ratio_down"]), ("mid_blocks", cfg["mlp_ratio_mid"]),
              ("up_blocks", cfg["mlp_ratio_up"]))
    for stage, ratio in stages:
        ffn = (1, ("ffn", float(ratio)))
        for i, blk in enumerate(getattr(model, stage)):
            p = f"{stage}.{i}"
            L[f"{p}.attn.to_q"] = (((1, "q"), D), ((1, "q"),))
            L[f"{p}.attn.to_k"] = (((1, "kv"), D), ((1, "kv"),))
            L[f"{p}.attn.to_v"] = (((1, "kv"), D), ((1, "kv"),))
            L[f"{p}.attn.to_out"] = ((D, (1, "q")), (D,))
            if hasattr(blk.attn, "gate"):
                L[f"{p}.attn.gate"] = (((1, "heads"), D), ((1, "heads"),))
            L[f"{p}.cross_attn.to_q"] = ((KEEP, D), (KEEP,))  # fixed inner width; K/V (text side) untouched
            L[f"{p}.cross_attn.to_out"] = ((D, KEEP), (D,))
            L[f"{p}.ff.fc1"] = ((ffn, D), (ffn,))
            L[f"{p}.ff.fc2"] = ((D, ffn), (D,))
    return L


def _param_layouts(model) -> dict[str, tuple]:
    """Parameter name -> layout, for every shared parameter that a narrower width slices."""
    out = {}
    for path, (wl, bl) in _linear_layouts(model).items():
        out[f"{path}.weight"], out[f"{path}.bias"] = wl, bl
    out["patch_embed.weight"] = out["patch_embed.bias"] = (D,)
    for path, blk in _named_blocks(model):
        for name in ("compress_k", "compress_v"):
            if hasattr(blk.attn, name):
                p = f"{path}.attn.{name}.conv"
                out[f"{p}.weight"] = out[f"{p}.bias"] = ((1, "kv"),)
    return out


def _named_blocks(model):
    """(path, block) of every DiT block, in execution order (the order of model.blocks())."""
    return [(f"{stage}.{i}", blk) for stage in ("down_blocks", "mid_blocks", "up_blocks")
            for i, blk in enumerate(getattr(model, stage))]


def _modulated(model):
    """(path, module) of the modules with a private modulation table: every block and the final layer."""
    return _named_blocks(model) + [("final_layer", model.final_layer)]


def make_elastic(model, widths: Sequence[float]) -> None:
    """Turn a freshly built PocketDiT into a supernet over ``widths`` in place (PocketDiT.__init__ calls this)."""
    widths = check_widths(model.config, widths)
    model._elastic_widths = widths
    model._width = 1.0
    modules = dict(model.named_modules())
    for path, (wl, bl) in _linear_layouts(model).items():
        _replace(model, path, SlicedLinear.wrap(modules[path], wl, bl))
    _replace(model, "patch_embed", SlicedConv2d.wrap(model.patch_embed))
    d = model.config["hidden_size"]
    for path, module in list(model.named_modules()):
        if type(module) is nn.LayerNorm and tuple(module.normalized_shape) == (d,):
            _replace(model, path, SlicedLayerNorm.wrap(module, widths))
    for _, m in _modulated(model):
        table = m.scale_shift_table.detach()
        m.scale_shift_tables = nn.ParameterDict(
            {width_key(w): nn.Parameter(table[:, : int(round(w * d))].clone()) for w in widths if w < 1}
        )


@torch.no_grad()
def init_private_from_full(model) -> None:
    """Reset every narrower width's private parameters to the slice of the full-width ones (as ``make_elastic``
    does at build time): for a supernet grown from a trained plain model, whose full-width weights were loaded
    after the private copies were cut from the random initialisation."""
    _check_supernet(model)
    for _, m in _modulated(model):
        for key, table in m.scale_shift_tables.items():
            table.copy_(m.scale_shift_table[:, : table.shape[1]])
    for m in model.modules():
        if isinstance(m, SlicedLayerNorm) and m.weight is not None:
            for key, w in m.width_weight.items():
                w.copy_(m.weight[: w.shape[0]])
            for key, b in m.width_bias.items():
                b.copy_(m.bias[: b.shape[0]])


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _check_supernet(model):
    if not getattr(model, "_elastic_widths", None):
        raise ValueError(
            "this PocketDiT is not an elastic supernet (it was built without elastic_widths), so it has one width; "
            "train one with method.name: elastic and model elastic_widths: [...]"
        )


def _check_width(model, width: float) -> float:
    _check_supernet(model)
    w = float(width)
    if w not in model._elastic_widths:
        raise ValueError(
            f"width {width:g} is not one of this supernet's widths {format_widths(model._elastic_widths)}"
        )
    return w


def _active_sizes(model, w: float) -> Optional[WidthSizes]:
    """What the sliced layers read for width ``w``: None at full width (nothing is sliced)."""
    return None if w == 1.0 else width_sizes(model.config, w)


def set_width(model, width: float) -> None:
    """Make every layer compute at ``width`` (one of the supernet's ``elastic_widths``)."""
    w = _check_width(model, width)
    sizes = _active_sizes(model, w)
    for m in model.modules():
        if isinstance(m, (SlicedLinear, SlicedConv2d, SlicedLayerNorm)):
            m.active = sizes
    for _, m in _modulated(model):
        m.active_width_key = None if sizes is None else width_key(w)
    model._width = w


@contextlib.contextmanager
def at_width(model, width: float) -> Iterator:
    """``with at_width(model, 0.5):`` runs the supernet at 0.5 and restores the width it had on exit."""
    before = getattr(model, "_width", 1.0)
    set_width(model, width)
    try:
        yield model
    finally:
        set_width(model, before)


def sliced_state_dict(model, width: float) -> dict[str, torch.Tensor]:
    """The standalone state dict of ``width``: shared parameters sliced, private ones of that width, fixed ones
    as they are. Keys are those of ``PocketDiT(**sub_config(config, width))``."""
    w = _check_width(model, width)
    sizes = _active_sizes(model, w)
    key = width_key(w)
    layouts = _param_layouts(model)
    private = {}
    for path, m in _modulated(model):
        private[f"{path}.scale_shift_table"] = m.scale_shift_table if sizes is None else m.scale_shift_tables[key]
    if sizes is not None:
        for path, m in model.named_modules():
            if isinstance(m, SlicedLayerNorm) and m.weight is not None:
                private[f"{path}.weight"] = m.width_weight[key]
                if m.bias is not None:
                    private[f"{path}.bias"] = m.width_bias[key]
    out = {}
    for name, p in model.named_parameters():
        if any(part in name for part in (".scale_shift_tables.", ".width_weight.", ".width_bias.")):
            continue  # the narrower widths' private copies (the one of this width is in `private`)
        if name in private:
            t = private[name]
        elif name in layouts:
            t = slice_param(p, layouts[name], sizes)
        else:
            t = p
        out[name] = t.detach().clone().contiguous()
    return out


def check_selectable(model, width: Optional[float]) -> None:
    """A ValueError (naming the widths) unless ``select_width(model, width)`` can give that width; cuts nothing,
    so a command checks its ``--width`` before the work."""
    if width is None or (not getattr(model, "_elastic_widths", None) and float(width) == 1.0):
        return
    if not getattr(model, "_elastic_widths", None):
        raise ValueError(
            f"--width {width:g}: this model is not an elastic supernet (it has one width, 1); pass a checkpoint "
            "trained with method.name: elastic, or a width cut out of one with `pocketdit extract`"
        )
    _check_width(model, width)


def select_width(model, width: Optional[float]):
    """What a command's ``--width`` gives: the model itself for None (a supernet at its full width) or for 1.0
    (nothing to cut); the standalone cut of ``width`` for a supernet; a ValueError otherwise (check_selectable)."""
    check_selectable(model, width)
    return model if width is None or float(width) == 1.0 else extract_width(model, width).eval()


def extract_width(model, width: float):
    """A standalone PocketDiT equal to the supernet at ``width`` (its own config, exactly its own parameters)."""
    cfg = sub_config(model.config, _check_width(model, width))
    standalone = type(model).from_config(cfg)
    state = sliced_state_dict(model, width)
    standalone.load_state_dict(state, strict=True)
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        standalone = standalone.to(dtype=dtype)
    return standalone.train(model.training)
