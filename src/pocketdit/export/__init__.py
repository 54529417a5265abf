"""Export PocketDiT to on-device runtimes as separate static-shape graphs, each checked against eager PyTorch.

    from pocketdit.export import ExportConfig, export_pipeline
    result = export_pipeline(parts, "out/", ExportConfig(format="executorch", resolution=256))

Graphs (see `graphs.py`): text_encoder (token ids -> states), denoiser (one width, one step), decoder.
Formats: "executorch" (.pte, XNNPACK delegate; runs here through the ExecuTorch runtime), "onnx" (runs
through onnxruntime), "coreml" (.mlpackage; converts here, runs only on macOS). Every export checks each
graph on fresh random inputs and a whole `num_steps` generation against eager PyTorch and raises
`ParityError` with the PSNR when it is below `min_psnr`. A manifest `export.json` records shapes, files,
sizes and parity numbers; `pocketdit bench runtime` reads it.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ..elastic import select_width
from ..utils import read_json
from .graphs import (
    DecoderGraph, DenoiserGraph, GraphSpec, TextEncoderGraph, decoder_spec, denoiser_spec, fresh_inputs, text_encoder_spec,
)
from .parity import DEFAULT_MIN_PSNR, ParityError, ParityResult, check_generation, check_graph

__all__ = [
    "FORMATS",
    "ExportConfig",
    "ExportResult",
    "DeploymentParts",
    "load_parts",
    "check_resolution",
    "required_modules",
    "export_file_names",
    "export_pipeline",
    "export_graph",
    "load_runner",
    "ParityError",
    "GraphSpec",
    "DenoiserGraph",
    "TextEncoderGraph",
    "DecoderGraph",
]

FORMATS = ("executorch", "coreml", "onnx")
SUFFIXES = {"executorch": ".pte", "coreml": ".mlpackage", "onnx": ".onnx"}
MANIFEST = "export.json"
GRAPHS = ("text_encoder", "denoiser", "decoder")
# (format, scheme) pairs with no lowering here, and what to use instead
UNSUPPORTED = {("executorch", "int8"): "8da4w or palettize4", ("onnx", "8da4w"): "int8 or palettize4",
               ("coreml", "8da4w"): "palettize4 or int8"}


def export_file_names(fmt: Optional[str] = None) -> set:
    """Every name `export_pipeline` writes into its output directory (of one format, or of any)."""
    suffixes = [SUFFIXES[fmt]] if fmt is not None else list(SUFFIXES.values())
    return {MANIFEST} | {f"{g}{s}" for g in GRAPHS for s in suffixes}


def required_modules(fmt: Optional[str], scheme: Optional[str] = None) -> list:
    """The optional packages (the `export` extra) that exporting to `fmt` (None: eager PyTorch) with `scheme`
    imports: the exporter and the runtime of the parity check, and the quantizer of the scheme."""
    modules = {None: [], "executorch": ["executorch"], "onnx": ["onnx", "onnxruntime"], "coreml": ["coremltools"]}[fmt]
    if scheme == "palettize4":
        modules = modules + ["coremltools"]  # its k-means is coremltools' post-training palettizer
    elif scheme in ("int8", "8da4w") and not (fmt == "onnx" and scheme == "int8"):  # onnx int8: onnxruntime's
        modules = modules + ["torchao"]
    return list(dict.fromkeys(modules))


@dataclass
class ExportConfig:
    """What to export.

    format: "executorch", "coreml" or "onnx". resolution: image side in pixels (the latent side is
    resolution / the autoencoder's downsample factor). width: the width of an elastic supernet to export
    (a fraction, one of its elastic_widths; None = the checkpoint as it is). quantize: apply this scheme ("palettize4", "int8", "8da4w") before exporting, unless
    the checkpoint is already quantized. num_steps/shift: the generation checked end to end.
    """

    format: str = "executorch"
    resolution: int = 256
    width: Optional[float] = None
    quantize: Optional[str] = None
    batch_size: int = 1
    num_steps: int = 4
    shift: Optional[float] = None
    min_psnr: float = DEFAULT_MIN_PSNR
    text_length: int = 16  # text tokens of the denoiser graph when there is no text encoder to export
    seed: int = 0

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        from ..quantize import SCHEMES

        if self.quantize is not None and self.quantize not in SCHEMES:
            raise ValueError(f"quantize must be one of {sorted(SCHEMES)} or None, got {self.quantize!r}")
        for key in ("resolution", "batch_size", "num_steps", "text_length"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")


@dataclass
class DeploymentParts:
    """The eager pieces of a pipeline: transformer, optional text conditioner and autoencoder, sampling shift."""

    transformer: torch.nn.Module
    text_conditioner: Optional[object] = None
    autoencoder: Optional[object] = None
    shift: float = 1.0
    source: str = ""
    default_size: Optional[int] = None


@dataclass
class ExportResult:
    out_dir: Path
    files: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------
# Loading what to export
# ----------------------------------------------------------------------------------------------------
def load_parts(path: Union[str, os.PathLike], text_encoder: Optional[str] = None, autoencoder: Optional[str] = None) -> DeploymentParts:
    """Transformer (plain or quantized), text conditioner and autoencoder from a checkpoint path.

    `path` may be a pipeline directory (model_index.json, or the earlier pipeline.json, + transformer/), a
    training run or checkpoint directory, or a bare PocketDiT / quantized PocketDiT directory. `text_encoder` / `autoencoder` specs
    ("minilm" / "pixel" / a local directory; "none" to leave out) override what the checkpoint records.
    """
    from ..quantize import load_denoiser

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist; pass a pipeline, training run or PocketDiT directory")
    text = ae = None
    shift = 1.0
    default_size = None
    text_lengths = None
    if (p / "pipeline.json").is_file():
        meta = read_json(p / "pipeline.json")
        for key in ("text_encoders", "autoencoder"):
            if key not in meta:
                raise ValueError(f"{p / 'pipeline.json'} has no {key!r} entry; is it a PocketDiT pipeline?")
        transformer = load_denoiser(p / "transformer")
        text_encoder = text_encoder or ",".join(meta["text_encoders"])
        if autoencoder is None:
            spec = meta["autoencoder"]
            autoencoder = str(p / spec[2:]) if spec.startswith("./") else spec
        shift = float(meta.get("default_shift", 1.0))
        default_size = meta.get("default_size")
        text_lengths = meta.get("text_max_lengths") if text_encoder == ",".join(meta["text_encoders"]) else None
    elif (p / "model_index.json").is_file():  # PocketDiTPipeline.save_pretrained
        index = read_json(p / "model_index.json")
        if not isinstance(index, dict) or "transformer" not in index:
            raise ValueError(f"{p / 'model_index.json'} has no 'transformer' entry; is it a PocketDiT pipeline?")
        transformer = load_denoiser(p / "transformer")
        if text_encoder is None:
            from ..text import TextConditioner

            text = TextConditioner.from_pretrained(p / "text_conditioner")
        if autoencoder is None:
            autoencoder = str(p / "autoencoder")
        scheduler_config = p / "scheduler" / "scheduler_config.json"
        shift = float(read_json(scheduler_config).get("shift", 1.0)) if scheduler_config.is_file() else 1.0
        default_size = index.get("default_size")
    elif _is_pocketdit_dir(p) or _is_pocketdit_dir(p / "transformer"):
        transformer = load_denoiser(p)
    else:  # a training run or one of its checkpoints: its config names the text encoders and the autoencoder
        from ..checkpoint import CheckpointError, load_checkpoint_weights, resolve_checkpoint
        from ..pipeline import _checkpoint_shift

        ckpt = resolve_checkpoint(p)
        state_file = ckpt / "trainer_state.json"
        if not state_file.is_file():
            raise CheckpointError(f"{ckpt} has no trainer_state.json, so its text encoder and autoencoder are unknown")
        try:
            cfg = read_json(state_file)["config"]
            recorded_text, recorded_ae = ",".join(cfg["text"]["encoders"]), cfg["autoencoder"]
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{state_file} has no config.text.encoders / config.autoencoder entry ({e})") from None
        transformer = load_checkpoint_weights(ckpt, ema=True)
        if text_encoder is None:
            text_encoder, text_lengths = recorded_text, cfg["text"].get("max_length")
        autoencoder = recorded_ae if autoencoder is None else autoencoder
        shift = _checkpoint_shift(cfg)
        default_size = (cfg.get("data") or {}).get("resolution")
    if text_encoder and text_encoder != "none":
        from ..text import build_text_conditioner

        specs = text_encoder.split(",")
        text = build_text_conditioner(specs, dropout_probs=0.0, max_lengths=text_lengths)
    if autoencoder and autoencoder != "none":
        from ..autoencoder import load_autoencoder

        ae = load_autoencoder(autoencoder)
    _check_components(transformer, text, ae, p)
    return DeploymentParts(transformer.eval(), text, ae, shift, str(p), default_size)


def _check_components(transformer, text, ae, source: Path) -> None:
    """The text encoders' widths and the autoencoder's latent channels must be the ones the model takes."""
    want = list(getattr(transformer.config, "text_embed_dims", []))
    if text is not None:
        got = [getattr(e, "embed_dim", None) for e in getattr(text, "encoders", [])]
        if got != want:
            raise ValueError(f"the text encoder(s) {list(getattr(text, 'names', ()))} give embeddings of width {got}, "
                             f"but the model in {source} takes {want}; pass a matching --text-encoder (or 'none')")
    channels = getattr(ae, "latent_channels", None) if ae is not None else None
    if channels is not None and channels != transformer.config.in_channels:
        raise ValueError(f"the autoencoder {getattr(ae, 'name', type(ae).__name__)!r} has {channels} latent channels, "
                         f"but the model in {source} takes {transformer.config.in_channels}; pass a matching --autoencoder")


def check_resolution(parts: DeploymentParts, resolution: int, model=None) -> int:
    """Image side -> latent side; an InvalidResolutionError (a ValueError) naming nearby valid image sizes."""
    from ..model import InvalidResolutionError

    model = model if model is not None else parts.transformer
    factor = getattr(parts.autoencoder, "downsample_factor", 1) if parts.autoencoder is not None else 1
    target = max(1, resolution // factor)  # square images: square latents, the model's nearest valid ones
    squares = [h for h, w in model.valid_latent_sizes_near(target, target, count=10**6) if h == w][:4]
    near = ", ".join(str(n * factor) for n in sorted(squares))
    if resolution < 1 or resolution % factor:
        raise InvalidResolutionError(f"resolution {resolution} is not a multiple of the autoencoder's downsample factor "
                                     f"{factor}; nearest valid image sizes: {near}")
    latent = resolution // factor
    if not model.is_valid_latent_size(latent, latent):
        raise InvalidResolutionError(f"resolution {resolution} (latent {latent}x{latent}) is not valid for this model; "
                                     f"nearest valid image sizes: {near}")
    return latent


def _is_pocketdit_dir(d: Path) -> bool:
    try:
        return json.loads((d / "config.json").read_text()).get("_class_name") == "PocketDiT"
    except (OSError, ValueError):
        return False


def effective_scheme(model, scheme: Optional[str], fmt: str) -> Optional[str]:
    """The scheme the export will have (the checkpoint's own when already quantized); a ValueError when it
    conflicts with the checkpoint's or has no lowering to `fmt`."""
    existing = getattr(model, "_pocketdit_quantization", None)
    if existing is not None:
        if scheme is not None and scheme != existing["scheme"]:
            raise ValueError(f"the checkpoint is already quantized with {existing['scheme']!r}; cannot also apply {scheme!r}")
        scheme = existing["scheme"]
    if scheme is not None and (fmt, scheme) in UNSUPPORTED:
        raise ValueError(f"scheme {scheme!r} has no {fmt} lowering here; use --quantize {UNSUPPORTED[fmt, scheme]}")
    return scheme


def _apply_quantization(model, scheme: Optional[str], fmt: str, calibration=None, progress: bool = True):
    from ..quantize import config_for_scheme, quantize_, random_calibration

    existing = getattr(model, "_pocketdit_quantization", None)
    scheme = effective_scheme(model, scheme, fmt)
    if existing is None and scheme is not None:
        model = copy.deepcopy(model)
        cfg = config_for_scheme(scheme)
        if scheme == "palettize4":
            quantize_(model, cfg, calibration=calibration or random_calibration(model), progress=progress)
        elif not (fmt == "onnx" and scheme == "int8"):
            quantize_(model, cfg)  # onnx int8 is done by onnxruntime on the float graph instead
    return model, scheme


# ----------------------------------------------------------------------------------------------------
# One graph
# ----------------------------------------------------------------------------------------------------
def export_graph(spec: GraphSpec, fmt: str, path: Path, scheme: Optional[str] = None) -> Path:
    """Write one graph in `fmt`; palettized Core ML models keep their LUTs, ONNX int8 goes through ORT."""
    if fmt == "executorch":
        from .executorch import export_executorch

        return export_executorch(spec, path)
    if fmt == "onnx":
        from .onnx import export_onnx, quantize_onnx_int8

        export_onnx(spec, path)
        if scheme == "int8" and spec.name == "denoiser":
            quantize_onnx_int8(path)
        return path
    from .coreml import export_coreml

    compression = {"palettize4": "palettize", "int8": "int8"}.get(scheme) if spec.name == "denoiser" else None
    return export_coreml(spec, path, weight_compression=compression)


def load_runner(fmt: str, path: Union[str, os.PathLike], spec: Optional[GraphSpec] = None, threads: Optional[int] = None):
    """A callable running one exported graph. Core ML off macOS: the torch.export program it was made from."""
    if fmt == "executorch":
        from .executorch import ExecuTorchRunner

        return ExecuTorchRunner(path, threads=threads)
    if fmt == "onnx":
        from .onnx import OnnxRunner

        return OnnxRunner(path, threads=threads)
    from .coreml import CoreMLRunner, can_run_coreml

    if can_run_coreml():
        return CoreMLRunner(path, spec.input_names, spec.output_names[0])
    if spec is None:
        raise RuntimeError("Core ML models cannot run on this OS")
    with torch.no_grad():
        program = torch.export.export(spec.module, spec.example_inputs, strict=False).run_decompositions()
    return program.module()


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def _io(spec: GraphSpec) -> dict:
    return {
        "inputs": [{"name": n, "shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")} for n, x in zip(spec.input_names, spec.example_inputs)],
        "outputs": list(spec.output_names),
    }


# ----------------------------------------------------------------------------------------------------
# The whole pipeline
# ----------------------------------------------------------------------------------------------------
def build_specs(parts: DeploymentParts, config: ExportConfig, model=None) -> dict[str, GraphSpec]:
    model = model if model is not None else parts.transformer
    ae = parts.autoencoder
    latent = check_resolution(parts, config.resolution, model)
    specs = {}
    encoders = list(getattr(parts.text_conditioner, "encoders", [])) if parts.text_conditioner is not None else []
    if len(encoders) > 1:
        raise ValueError("exporting more than one text encoder is not supported yet; pass --text-encoder none to export the denoiser alone")
    if encoders:
        specs["text_encoder"] = text_encoder_spec(encoders[0], config.batch_size, config.seed)
        lengths = [encoders[0].max_length]
    else:
        lengths = [config.text_length] * len(model.config.text_embed_dims)
    specs["denoiser"] = denoiser_spec(model, latent, config.batch_size, lengths, config.seed)
    is_pixel = ae is None or getattr(ae, "name", "") == "pixel"
    if not is_pixel:
        specs["decoder"] = decoder_spec(ae, latent, config.batch_size, config.seed)
    return specs


def export_pipeline(parts: DeploymentParts, out_dir: Union[str, os.PathLike], config: ExportConfig, progress: bool = True) -> ExportResult:
    """Export every graph, check each and a whole generation against eager PyTorch, write export.json."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    model = select_width(parts.transformer.eval(), config.width)
    # what can be checked in a moment fails before the (palettization's minutes of) work
    check_resolution(parts, config.resolution, model)
    effective_scheme(model, config.quantize, config.format)
    model, scheme = _apply_quantization(model, config.quantize, config.format, progress=progress)
    specs = build_specs(parts, config, model)
    out.mkdir(parents=True, exist_ok=True)
    result = ExportResult(out)
    runners = {}
    runtime = {"executorch": "executorch", "onnx": "onnxruntime", "coreml": "coreml"}[config.format]
    parity_runtime = runtime
    from .coreml import can_run_coreml

    if config.format == "coreml" and not can_run_coreml():
        parity_runtime = "torch.export program (Core ML cannot run off macOS)"
    manifest_graphs = {}
    for name, spec in tqdm(specs.items(), desc=f"export {config.format}", disable=not progress):
        path = out / f"{name}{SUFFIXES[config.format]}"
        t0 = time.perf_counter()
        export_graph(spec, config.format, path, scheme)
        seconds = time.perf_counter() - t0
        runner = load_runner(config.format, path, spec)
        runners[name] = runner
        # ONNX int8 is quantized by onnxruntime after export, so its reference is the float graph and the
        # threshold is that of a quantized model (reported, checked against the palettization target).
        min_psnr = config.min_psnr if not (scheme == "int8" and config.format == "onnx" and name == "denoiser") else 30.0
        par = check_graph(spec, runner, parity_runtime, min_psnr, seed=config.seed + 1)
        result.files[name] = path
        result.sizes[name] = _size(path)
        result.parity[name] = par
        manifest_graphs[name] = {"file": path.name, "bytes": result.sizes[name], "export_seconds": round(seconds, 2), **_io(spec), "parity": par.as_dict()}

    g = torch.Generator().manual_seed(config.seed + 7)
    den = specs["denoiser"]
    inputs = {"noise": torch.randn(den.example_inputs[0].shape, generator=g)}
    if "text_encoder" in specs:
        inputs["input_ids"], inputs["attention_mask"] = fresh_inputs(specs["text_encoder"], config.seed + 8)
    else:
        k = len(model.config.text_embed_dims)
        ex = fresh_inputs(den, config.seed + 8)
        inputs["text_states"], inputs["text_masks"] = list(ex[2 : 2 + k]), list(ex[2 + k :])
    eager = {n: s.module for n, s in specs.items()}
    shift = parts.shift if config.shift is None else config.shift
    min_img = config.min_psnr if not (scheme == "int8" and config.format == "onnx") else 30.0
    gen = check_generation(eager, runners, inputs, parity_runtime, config.num_steps, shift, min_img)
    result.parity["image"] = gen
    quant = getattr(model, "_pocketdit_quantization", None)
    result.manifest = {
        "format": config.format,
        "source": parts.source,
        "config": asdict(config),
        "quantization": None if scheme is None else {"scheme": scheme, **({"average_bits": quant["report"]["average_bits"]} if quant and "report" in quant else {})},
        "hidden_size": model.config.hidden_size,
        "latent_shape": list(den.example_inputs[0].shape),
        "num_steps": config.num_steps,
        "shift": shift,
        "text_encoder": None if parts.text_conditioner is None else list(getattr(parts.text_conditioner, "names", ())),
        "autoencoder": None if parts.autoencoder is None else getattr(parts.autoencoder, "name", type(parts.autoencoder).__name__),
        "parity_runtime": parity_runtime,
        "graphs": manifest_graphs,
        "image_parity": gen.as_dict(),
    }
    (out / MANIFEST).write_text(json.dumps(result.manifest, indent=2) + "\n")
    return result
