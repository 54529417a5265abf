"""`pocketdit quantize`: argument parsing and reporting around pocketdit.quantize; takes the remaining argv
and returns an exit code. A pipeline in gives a pipeline out; --eval compares its images with fp32's."""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from ..utils import cli_error, format_mib
from .api import config_for_scheme, psnr, quantize_
from .calibration import random_calibration, trajectory_calibration
from .distill import self_distill_
from .storage import QUANT_CONFIG_NAME, load_denoiser, save_quantized


def quantize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pocketdit quantize",
        description="Quantize a PocketDiT (pipeline, training run/checkpoint, or bare transformer directory).",
    )
    p.add_argument("checkpoint", help="pipeline directory, training run, checkpoint-* directory or PocketDiT directory")
    p.add_argument("--scheme", required=True, choices=["palettize4", "int8", "8da4w"])
    p.add_argument("-o", "--output", required=True, help="output directory (a pipeline directory when the input has one)")
    p.add_argument("--nbits", type=int, default=4, help="palettize4: bits of most layers")
    p.add_argument("--high-nbits", type=int, default=8, help="palettize4: bits of the sensitive layers")
    p.add_argument("--target-avg-bits", type=float, default=4.3, help="palettize4: average bits to stay within")
    p.add_argument("--group-size", type=int, default=32, help="8da4w: weights per quantization group")
    p.add_argument("--lut-group-channels", type=int, default=None,
                   help="palettize4: one LUT per this many output channels (default: one LUT per tensor)")
    p.add_argument("--calibration", choices=["trajectories", "random"], default="trajectories",
                   help="palettize4 inputs for sensitivity and fine-tuning: the fp32 model's own sampling trajectories "
                        "on ShapesEval prompts (needs a text encoder), or synthetic random inputs")
    p.add_argument("--calibration-prompts", type=int, default=48,
                   help="prompts used for trajectory calibration (disjoint from the --eval prompts)")
    p.add_argument("--sensitivity", choices=["model_output", "relative_mse", "mse"], default="model_output",
                   help="palettize4: how layers are ranked for high_nbits: the model output's error with that layer "
                        "alone palettized (default), or the paper's error of the layer's own output")
    p.add_argument("--sensitivity-batches", type=int, default=8,
                   help="palettize4: calibration batches (evenly spaced) used to rank layers for 8 bits (GPTQ's "
                        "input statistics use every batch)")
    p.add_argument("--assignment", choices=["gptq", "nearest"], default="gptq",
                   help="palettize4: how weights map to LUT entries: column by column so each layer's output on the "
                        "calibration inputs changes least (GPTQ-style, default), or each weight to its nearest entry")
    p.add_argument("--finetune-steps", type=int, default=0, help="palettize4: self-distillation steps after palettization")
    p.add_argument("--finetune-luts", action="store_true",
                   help="palettize4: also train the LUT entries (indices fixed) during self-distillation")
    p.add_argument("--finetune-indices", action="store_true",
                   help="palettize4: quantization-aware self-distillation: latent float weights re-assigned to their "
                        "nearest LUT entry every step (straight-through gradient); implies --finetune-luts")
    p.add_argument("--lr", type=float, default=None,
                   help="self-distillation peak learning rate, cosine decay (default: 3e-5 with --finetune-indices, "
                        "where latent weights move between entries, else 1e-4; measured on the shapes checkpoint)")
    p.add_argument("--eval", action="store_true", help="measure image PSNR vs fp32 (and ShapesEval with --shapes-eval)")
    p.add_argument("--shapes-eval", action="store_true", help="also score fp32 and quantized with ShapesEval (slow)")
    p.add_argument("--shapes-eval-images", type=int, default=4,
                   help="ShapesEval images per prompt (same seeds for fp32 and quantized)")
    p.add_argument("--eval-steps", type=int, default=None, help="sampling steps for evaluation (default: the pipeline's)")
    p.add_argument("--eval-images", type=int, default=16, help="images for the PSNR comparison")
    p.add_argument("--seed", type=int, default=0)
    return p


def _load_pipeline(path: str):
    """(pipeline or None, transformer). A bare PocketDiT directory has no pipeline."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist; pass a pipeline, training run or PocketDiT directory")
    if (p / "config.json").is_file() and json.loads((p / "config.json").read_text()).get("_class_name") == "PocketDiT":
        return None, load_denoiser(p)
    from ..pipeline import PocketDiTPipeline

    pipe = PocketDiTPipeline.from_pretrained(p)
    pipe.transformer.eval()
    return pipe, pipe.transformer


def _eval_prompts(n: int, calibration: bool = False) -> list[str]:
    """n ShapesEval prompts spread over the categories; calibration=True picks a disjoint set (the next
    prompt after each evaluation prompt), so quantization is not tuned on the prompts it is judged on."""
    from ..evaluate.shapes_eval import load_prompts

    prompts = [p["prompt"] for p in load_prompts("v1")]  # pinned: the prompts BENCHMARKS and the deployment docs used
    step = max(2, len(prompts) // n)
    return prompts[int(calibration) :: step][:n]


def _images(pipe, transformer, prompts, steps, seed, height=None, width=None):
    """Images in [-1, 1] from `transformer` in `pipe`, one seed per image (seed + i)."""
    original = pipe.transformer
    pipe.transformer = transformer
    pipe.set_progress_bar_config(disable=True)
    try:
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        out = pipe(prompts, num_inference_steps=steps, seed=seeds, height=height, width=width, output_type="pt")
        return out.images * 2 - 1
    finally:
        pipe.transformer = original


def _shapes_eval(pipe, transformer, steps, seed, images_per_prompt: int = 1) -> dict:
    from ..evaluate.shapes_eval import evaluate_generator

    size = pipe.default_size or 32

    def generate(prompts, seeds):
        return _images(pipe, transformer, prompts, steps, seeds, height=size, width=size)

    return evaluate_generator(generate, size, images_per_prompt=images_per_prompt, seed=seed)


def quantize_command(argv: Sequence[str]) -> int:
    args = quantize_parser().parse_args(list(argv))
    if not args.finetune_steps and (args.finetune_luts or args.finetune_indices or args.lr is not None):
        return cli_error("--finetune-luts, --finetune-indices and --lr configure self-distillation; pass --finetune-steps N too")
    try:
        pipe, model = _load_pipeline(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        return cli_error(str(e))
    if getattr(model, "_pocketdit_quantization", None) is not None:
        return cli_error(f"{args.checkpoint} is already quantized ({model._pocketdit_quantization['scheme']}); start from the float checkpoint")
    fp32 = model
    quantized = copy.deepcopy(model)
    t0 = time.perf_counter()
    overrides = {}
    calibration = None
    guidance = None  # set when the calibration batches stack [conditional; unconditional]
    if args.scheme == "palettize4":
        overrides = dict(
            nbits=args.nbits, high_nbits=args.high_nbits, target_avg_bits=args.target_avg_bits, sensitivity=args.sensitivity,
            assignment=args.assignment,
        )
        if args.lut_group_channels:
            overrides.update(granularity="per_grouped_channel", group_size=args.lut_group_channels)
        if args.calibration == "trajectories" and pipe is not None:
            steps = args.eval_steps or pipe.default_steps
            calibration = trajectory_calibration(pipe, _eval_prompts(args.calibration_prompts, calibration=True), steps, args.seed)
            guidance = pipe.default_guidance if pipe.default_guidance != 1.0 else None
            print(
                f"calibration: {len(calibration)} batches (conditional and unconditional calls stacked) from {steps}-step guided "
                f"fp32 trajectories on {args.calibration_prompts} ShapesEval prompts"
            )
        else:
            if args.calibration == "trajectories":
                print("calibration: no text encoder/pipeline here, using synthetic random inputs")
            calibration = random_calibration(model, num_batches=8)
    elif args.scheme == "8da4w":
        overrides = dict(group_size=args.group_size)
    try:
        config = config_for_scheme(args.scheme, **overrides)
        report = quantize_(quantized, config, calibration=calibration, sensitivity_batches=args.sensitivity_batches)
    except ValueError as e:
        return cli_error(str(e))
    if args.finetune_steps:
        if args.scheme != "palettize4":
            return cli_error("--finetune-steps applies to palettize4 only")
        lr = args.lr if args.lr is not None else (3e-5 if args.finetune_indices else 1e-4)
        losses = self_distill_(
            quantized, fp32, calibration, steps=args.finetune_steps, lr=lr, train_luts=args.finetune_luts,
            train_indices=args.finetune_indices, guidance_scale=guidance,
        )
        print(f"self-distillation: {args.finetune_steps} steps, loss {losses[0]:.4g} -> {sum(losses[-10:]) / len(losses[-10:]):.4g}")
    quantized._pocketdit_quantization.setdefault("report", report.to_dict() if report else {})
    out = Path(args.output)
    if pipe is not None:
        # A pipeline in, a pipeline out: same scheduler, text encoder and autoencoder, quantized transformer/.
        pipe.transformer = quantized
        try:
            pipe.save_pretrained(out)
        finally:
            pipe.transformer = fp32
        meta = json.loads((out / "transformer" / QUANT_CONFIG_NAME).read_text())
    else:
        meta = save_quantized(quantized, out)
    seconds = time.perf_counter() - t0
    fp32_bytes = sum(p.numel() * 4 for p in fp32.parameters())
    summary = {"scheme": args.scheme, "seconds": round(seconds, 1), "file_bytes": meta["file_size_bytes"], "fp32_param_bytes": fp32_bytes}
    if args.finetune_steps:
        summary["finetune"] = dict(
            steps=args.finetune_steps, lr=lr, luts=args.finetune_luts or args.finetune_indices, indices=args.finetune_indices,
            guided_loss=guidance is not None, calibration_batches=len(calibration),
        )
    if report is not None:
        summary.update(
            average_bits=round(report.average_bits, 3), high_bit_layers=report.num_high_bit_layers, layers=len(report.layer_bits),
            assignment=config.assignment,
        )
    if args.eval:
        if pipe is None:
            return cli_error("--eval needs a pipeline (text encoder + autoencoder); this checkpoint is a bare transformer")
        steps = args.eval_steps or pipe.default_steps
        prompts = _eval_prompts(args.eval_images)
        with torch.no_grad():
            ref = _images(pipe, fp32, prompts, steps, args.seed + 1000)
            got = _images(pipe, quantized, prompts, steps, args.seed + 1000)
        summary["image_psnr_db"] = round(psnr(got, ref, peak=2.0), 2)
        # per image too: a guided trajectory sometimes tips a shape to another place, and one such image
        # dominates the pooled number
        per_image = sorted(psnr(got[i : i + 1], ref[i : i + 1], peak=2.0) for i in range(len(prompts)))
        summary["image_psnr_db_median"] = round(statistics.median(per_image), 2)
        summary["image_psnr_db_per_image"] = [round(v, 2) for v in per_image]
        from ..pipeline import make_grid, tensor_to_pil

        k = min(16, len(prompts))  # top row fp32, bottom row quantized, same prompts and seeds
        scale = max(1, 128 // ref.shape[-1])
        make_grid(tensor_to_pil(ref[:k]) + tensor_to_pil(got[:k]), ncols=k, scale=scale).save(out / "eval_fp32_vs_quantized.png")
        summary["eval_grid"] = "eval_fp32_vs_quantized.png"
        summary["eval_steps"] = steps
        if args.shapes_eval:
            for name, m in (("fp32", fp32), ("quantized", quantized)):
                result = _shapes_eval(pipe, m, steps, args.seed, args.shapes_eval_images)
                summary[f"shapes_eval_{name}"] = round(result["overall"], 4)
                summary[f"shapes_eval_{name}_categories"] = {k: round(v, 4) for k, v in result["categories"].items()}
            summary["shapes_eval_images_per_prompt"] = args.shapes_eval_images
    (out / "quantize_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"wrote {out} ({format_mib(meta['file_size_bytes'])} weights vs {format_mib(fp32_bytes)} fp32)")
    return 0
