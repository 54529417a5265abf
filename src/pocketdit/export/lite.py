"""Write a pipeline's `lite/` folder: the torch-free generation path of `pocketdit.lite`.

    from pocketdit.export.lite import write_lite
    report = write_lite("checkpoints/shapes-4step")          # every width of a supernet, or the model's one

For each width the denoiser is exported to ONNX (one step, batch 1, the pipeline's resolution and text length,
`export.graphs.DenoiserGraph` as `pocketdit export` writes it) and every float32 weight that fp16 holds exactly
is stored as fp16 behind a Cast (onnxruntime folds it back at load): a pipeline saved in fp16, or palettized with
fp16 tables, loses nothing and its graph halves. Then whole generations through `LitePipeline` are compared with
the eager pipeline on fixed prompts and seeds; below `min_psnr` (per image) nothing is left behind and
`ParityError` says by how much.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .parity import ParityError

CHECK_PROMPTS = ("a red circle", "two blue squares", "a green triangle to the left of a yellow diamond",
                 "three purple circles")


def compress_fp16(path: Path) -> int:
    """Store the ONNX model's float32 initializers that fp16 represents exactly as fp16 + Cast; returns bytes saved."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    before = path.stat().st_size
    casts, keep = [], []
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT or np.prod(init.dims) < 64:
            keep.append(init)
            continue
        arr = numpy_helper.to_array(init)
        half = arr.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), arr):
            keep.append(init)
            continue
        keep.append(numpy_helper.from_array(half, init.name + "__fp16"))
        casts.append(helper.make_node("Cast", [init.name + "__fp16"], [init.name], to=onnx.TensorProto.FLOAT,
                                      name=init.name + "__cast"))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return before - path.stat().st_size


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def write_lite(pipeline_dir, widths: Optional[Sequence[float]] = None, default_width: Optional[float] = None,
               seeds: Sequence[int] = (0, 1), prompts: Sequence[str] = CHECK_PROMPTS, min_psnr: float = 35.0,
               threads: Optional[int] = None) -> dict:
    """Export the denoiser(s) of the pipeline at `pipeline_dir` into `pipeline_dir/lite/` and check the torch-free
    path against the eager pipeline (see the module docstring). Returns the written lite.json."""
    import torch

    from ..elastic import select_width
    from ..lite import LITE_DIR, LITE_FORMAT, LitePipeline
    from ..pipeline import PocketDiTPipeline
    from .graphs import denoiser_spec
    from .onnx import export_onnx

    root = Path(pipeline_dir)
    pipe = PocketDiTPipeline.from_pretrained(root)
    conditioner, ae = pipe.text_conditioner, pipe.autoencoder
    encoders = list(getattr(conditioner, "encoders", []))
    if len(encoders) != 1 or not type(encoders[0]).__name__ == "MiniLMEncoder":
        raise ValueError("the torch-free path runs models conditioned on the MiniLM encoder alone")
    if type(ae).__name__ != "PixelSpace":
        raise ValueError("the torch-free path runs pixel-space models (an exported decoder is not wired in yet)")
    sched = pipe.scheduler.config
    if type(pipe.scheduler).__name__ != "FlowMatchEulerDiscreteScheduler" or sched.get("use_dynamic_shifting") \
            or sched.get("shift_terminal") or sched.get("stochastic_sampling"):
        raise ValueError("the torch-free path reproduces FlowMatchEulerDiscreteScheduler with a fixed shift only")
    model = pipe.transformer.float().eval()
    available = list(getattr(model, "elastic_widths", None) or [1.0])
    widths = [float(w) for w in (widths or available)]
    default_width = float(default_width if default_width is not None else max(widths))
    if default_width not in widths:
        raise ValueError(f"default width {default_width} is not among the exported widths {widths}")
    size = int(pipe.default_size)
    latent = size // ae.downsample_factor
    text_length = int(encoders[0].max_length)

    out = root / LITE_DIR
    staging = root / (LITE_DIR + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    graphs = {}
    for w in widths:
        sub = select_width(model, w)
        name = f"denoiser-w{w:g}.onnx"
        export_onnx(denoiser_spec(sub, latent, batch_size=1, text_lengths=[text_length]), staging / name)
        compress_fp16(staging / name)
        graphs[f"{w:g}"] = name
    meta = {
        "format": LITE_FORMAT, "resolution": size, "latent_shape": [1, ae.latent_channels, latent, latent],
        "shift": float(sched["shift"]), "num_train_timesteps": int(sched.get("num_train_timesteps", 1000)),
        "default_steps": int(pipe.default_steps), "default_guidance": float(pipe.default_guidance),
        "text_encoder": "minilm", "text_length": text_length, "autoencoder": "pixel",
        "graphs": graphs, "default_width": default_width,
        "bytes": {name: (staging / name).stat().st_size for name in graphs.values()},
    }
    (staging / "lite.json").write_text(json.dumps(meta, indent=2))

    # parity: whole generations, eager pipeline vs the staged lite folder
    try:
        lite = LitePipeline(root, threads=threads, folder=staging.name)
        parity = {}
        for w in widths:
            pipe.transformer = select_width(model, w)
            values = []
            for prompt in prompts:
                for seed in seeds:
                    with torch.no_grad():
                        ref = np.asarray(pipe(prompt, seed=seed).images[0])
                    values.append(_psnr(ref, lite(prompt, seed=seed, width=w)))
            finite = [v for v in values if np.isfinite(v)]
            # PSNR of an identical image is infinite: reported as null, and counted
            parity[f"{w:g}"] = {"images": len(values), "identical_images": len(values) - len(finite),
                                "min_psnr_db": min(finite) if finite else None,
                                "median_psnr_db": statistics.median(values) if len(finite) > len(values) / 2 else None}
            if min(values) < min_psnr:
                raise ParityError(f"torch-free path at width {w:g}: an image at {min(values):.1f} dB PSNR vs the eager "
                                  f"pipeline, below {min_psnr} dB")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        pipe.transformer = model
    meta["parity_vs_eager"] = {"prompts": list(prompts), "seeds": list(seeds), "steps": meta["default_steps"],
                               "guidance": meta["default_guidance"], "widths": parity}
    (staging / "lite.json").write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return meta
