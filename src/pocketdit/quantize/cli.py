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

from ..argtypes import (
    ArgumentParser, CLIError, check_output_dir, exit_code_command, finite_float, learning_rate, loading_input,
    non_negative_int, positive_float, positive_int, require_modules, seed,
)
from ..utils import atomic_directory, cli_error, format_mib
from .api import config_for_scheme, psnr, quantize_
from .calibration import random_calibration, trajectory_calibration
from .distill import self_distill_
from .storage import QUANT_CONFIG_NAME, load_denoiser, save_quantized

NBITS = (1, 2, 3, 4, 6, 8)  # LUT sizes PalettizeConfig takes
# options that configure one scheme only, with their defaults (None in the parser, so that giving one to
# another scheme is an error rather than silently ignored)
PALETTIZE_DEFAULTS = dict(nbits=4, high_nbits=8, target_avg_bits=4.3, calibration="trajectories", calibration_prompts=48,
                          sensitivity="model_output", sensitivity_batches=8, assignment="gptq", finetune_steps=0)
PALETTIZE_ONLY = ("nbits", "high_nbits", "target_avg_bits", "lut_group_channels", "calibration", "calibration_prompts",
                  "sensitivity", "sensitivity_batches", "assignment", "finetune_steps")
DA4W_DEFAULTS = dict(group_size=32)
# what each scheme imports beyond the core install (pyproject's `export` extra)
SCHEME_MODULES = {"palettize4": ["coremltools"], "int8": ["torchao"], "8da4w": ["torchao"]}


def _nbits(text: str) -> int:
    value = positive_int(text)
    if value not in NBITS:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(map(str, NBITS))} bits, got {value}")
    return value


def _group_size(text: str) -> int:
    value = positive_int(text)
    if value & (value - 1):
        raise argparse.ArgumentTypeError(f"expected a power of two, got {value}")
    return value


def quantize_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="pocketdit quantize",
        description="Quantize a PocketDiT (pipeline, training run/checkpoint, or bare transformer directory).",
    )
    d = PALETTIZE_DEFAULTS
    p.add_argument("checkpoint", help="pipeline directory, training run, checkpoint-* directory or PocketDiT directory")
    p.add_argument("--scheme", required=True, choices=["palettize4", "int8", "8da4w"])
    p.add_argument("--width", type=positive_float, default=None,
                   help="quantize this width of an elastic supernet, e.g. 0.5 (cut out as a standalone model)")
    p.add_argument("-o", "--output", required=True,
                   help="output directory (a pipeline directory when the input has one); must be new or empty "
                        "unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty output directory (a previous quantize output included)")
    p.add_argument("--nbits", type=_nbits, default=None, help=f"palettize4: bits of most layers, one of {NBITS} (default: {d['nbits']})")
    p.add_argument("--high-nbits", type=_nbits, default=None,
                   help=f"palettize4: bits of the sensitive layers, >= --nbits (default: {d['high_nbits']})")
    p.add_argument("--target-avg-bits", type=finite_float(1.0, 8.0), default=None,
                   help=f"palettize4: average bits to stay within, between --nbits and --high-nbits (default: {d['target_avg_bits']})")
    p.add_argument("--group-size", type=_group_size, default=None,
                   help=f"8da4w: weights per quantization group, a power of two (default: {DA4W_DEFAULTS['group_size']})")
    p.add_argument("--lut-group-channels", type=positive_int, default=None,
                   help="palettize4: one LUT per this many output channels (default: one LUT per tensor)")
    p.add_argument("--calibration", choices=["trajectories", "random"], default=None,
                   help="palettize4 inputs for sensitivity and fine-tuning: the fp32 model's own sampling trajectories "
                        "on ShapesEval prompts (needs a text encoder; the default), or synthetic random inputs")
    p.add_argument("--calibration-prompts", type=positive_int, default=None, metavar="N",
                   help="palettize4: number of ShapesEval prompts whose trajectories calibrate (disjoint from the "
                        f"--eval prompts; default: {d['calibration_prompts']})")
    p.add_argument("--sensitivity", choices=["model_output", "relative_mse", "mse"], default=None,
                   help="palettize4: how layers are ranked for high_nbits: the model output's error with that layer "
                        "alone palettized (default), or the paper's error of the layer's own output")
    p.add_argument("--sensitivity-batches", type=positive_int, default=None,
                   help="palettize4: calibration batches (evenly spaced) used to rank layers for 8 bits (GPTQ's "
                        f"input statistics use every batch; default: {d['sensitivity_batches']})")
    p.add_argument("--assignment", choices=["gptq", "nearest"], default=None,
                   help="palettize4: how weights map to LUT entries: column by column so each layer's output on the "
                        "calibration inputs changes least (GPTQ-style, default), or each weight to its nearest entry")
    p.add_argument("--finetune-steps", type=non_negative_int, default=None,
                   help="palettize4: self-distillation steps after palettization (default: 0, none)")
    p.add_argument("--finetune-luts", action="store_true",
                   help="palettize4: also train the LUT entries (indices fixed) during self-distillation")
    p.add_argument("--finetune-indices", action="store_true",
                   help="palettize4: quantization-aware self-distillation: latent float weights re-assigned to their "
                        "nearest LUT entry every step (straight-through gradient); implies --finetune-luts")
    p.add_argument("--lr", type=learning_rate, default=None,
                   help="self-distillation peak learning rate, cosine decay (default: 3e-5 with --finetune-indices, "
                        "where latent weights move between entries, else 1e-4; measured on the shapes checkpoint)")
    p.add_argument("--eval", action="store_true", help="measure image PSNR vs fp32 (and ShapesEval with --shapes-eval)")
    p.add_argument("--shapes-eval", action="store_true", help="with --eval: also score fp32 and quantized with ShapesEval (slow)")
    p.add_argument("--shapes-eval-images", type=positive_int, default=None,
                   help="with --shapes-eval: ShapesEval images per prompt (same seeds for fp32 and quantized; default: 4)")
    p.add_argument("--eval-steps", type=positive_int, default=None,
                   help="sampling steps for calibration trajectories and evaluation (default: the pipeline's)")
    p.add_argument("--eval-images", type=positive_int, default=None, help="with --eval: images for the PSNR comparison (default: 16)")
    p.add_argument("--seed", type=seed, default=0)
    return p


def _is_bare_transformer(p: Path) -> bool:
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and cfg.get("_class_name") == "PocketDiT"


def _load_pipeline(path: str):
    """(pipeline or None, transformer). A bare PocketDiT directory has no pipeline."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist; pass a pipeline, training run or PocketDiT directory")
    if _is_bare_transformer(p):
        return None, load_denoiser(p)
    from ..checkpoint import resolve_checkpoint
    from ..pipeline import PocketDiTPipeline
    from ..utils import read_json

    # the JSON files the pipeline loader reads, checked first so that a damaged one is named
    index = [f for f in (p / "model_index.json", p / "pipeline.json") if f.is_file()]
    for f in index or [resolve_checkpoint(p) / "trainer_state.json"]:
        if f.is_file():
            read_json(f)

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


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _prompt_capacity(calibration: bool) -> int:
    """How many distinct prompts `_eval_prompts` can give (every other prompt of the pinned set)."""
    from ..evaluate.shapes_eval import load_prompts

    return len(load_prompts("v1")[int(calibration) :: 2])


def _check_args(args) -> tuple:
    """Every argument before any work: options (their scheme, ranges, combinations), packages, the input and
    output paths. Fills in the scheme defaults; returns (input path, output path, is the input a bare transformer)."""
    given = [n for n in PALETTIZE_ONLY + ("lr",) if getattr(args, n) is not None]
    given += [n for n in ("finetune_luts", "finetune_indices") if getattr(args, n)]
    if args.scheme != "palettize4" and given:
        names = ", ".join(_option(n) for n in given)
        raise CLIError(f"{names} appl{'ies' if len(given) == 1 else 'y'} to --scheme palettize4 only")
    if args.scheme != "8da4w" and args.group_size is not None:
        raise CLIError("--group-size applies to --scheme 8da4w only (palettize4: --lut-group-channels)")
    defaults = {**PALETTIZE_DEFAULTS, **DA4W_DEFAULTS, "eval_images": 16, "shapes_eval_images": 4}
    explicit = {n for n in defaults if getattr(args, n) is not None}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not args.finetune_steps and (args.finetune_luts or args.finetune_indices or args.lr is not None):
        raise CLIError("--finetune-luts, --finetune-indices and --lr configure self-distillation; pass --finetune-steps N too")
    if args.shapes_eval and not args.eval:
        raise CLIError("--shapes-eval scores the --eval images; pass --eval too")
    if "shapes_eval_images" in explicit and not args.shapes_eval:
        raise CLIError("--shapes-eval-images applies with --shapes-eval only")
    if "eval_images" in explicit and not args.eval:
        raise CLIError("--eval-images applies with --eval only")
    overrides = {}
    if args.scheme == "palettize4":
        if args.high_nbits < args.nbits:
            raise CLIError(f"--high-nbits {args.high_nbits} must be >= --nbits {args.nbits}")
        if not args.nbits <= args.target_avg_bits <= args.high_nbits:
            default = "" if "target_avg_bits" in explicit else " (the default)"
            raise CLIError(f"--target-avg-bits {args.target_avg_bits:g}{default} must lie between --nbits {args.nbits} "
                           f"and --high-nbits {args.high_nbits}")
        overrides = dict(nbits=args.nbits, high_nbits=args.high_nbits, target_avg_bits=args.target_avg_bits,
                         sensitivity=args.sensitivity, assignment=args.assignment)
        if args.lut_group_channels:
            overrides.update(granularity="per_grouped_channel", group_size=args.lut_group_channels)
    elif args.scheme == "8da4w":
        overrides = dict(group_size=args.group_size)
    try:
        args.config = config_for_scheme(args.scheme, **overrides)
    except ValueError as e:
        raise CLIError(str(e)) from None

    source = Path(args.checkpoint)
    if not source.exists():
        raise CLIError(f"checkpoint {source} does not exist; pass a pipeline, training run or PocketDiT directory")
    if not source.is_dir():
        raise CLIError(f"checkpoint {source} is a file; pass a pipeline, training run or PocketDiT directory")
    bare = _is_bare_transformer(source)
    if args.eval and bare:
        raise CLIError(f"--eval needs a pipeline (text encoder + autoencoder); {source} is a bare transformer")
    require_modules(SCHEME_MODULES[args.scheme], f"quantize --scheme {args.scheme}", extra="export")
    trajectories = args.scheme == "palettize4" and args.calibration == "trajectories" and not bare
    if trajectories or args.eval:  # ShapesEval's prompts (and scorer) live in pocketdit.evaluate, which needs scipy
        require_modules(["scipy"], "quantize --eval" if args.eval else "quantize calibration on ShapesEval prompts "
                        "(--calibration trajectories)", extra="eval")
    if trajectories and args.calibration_prompts > _prompt_capacity(calibration=True):
        raise CLIError(f"--calibration-prompts {args.calibration_prompts}: at most {_prompt_capacity(True)} prompts are "
                       "set aside for calibration")
    if args.eval and args.eval_images > _prompt_capacity(calibration=False):
        raise CLIError(f"--eval-images {args.eval_images}: at most {_prompt_capacity(False)} evaluation prompts (one image each)")
    out = Path(args.output)
    try:
        same = out.resolve() == source.resolve()
    except OSError:
        same = False
    if same:
        raise CLIError(f"-o {out}: is the input checkpoint; choose another directory")
    check_output_dir(out, "-o", overwrite=args.overwrite)
    return source, out, bare


def _load_input(path: str):
    """_load_pipeline, with an input that is not a model (or a damaged one) as one CLIError line."""
    with loading_input(path):
        return _load_pipeline(path)


@exit_code_command
def quantize_command(argv: Sequence[str]) -> int:
    args = quantize_parser().parse_args(list(argv))
    _, out, _ = _check_args(args)
    pipe, model = _load_input(args.checkpoint)
    if args.width is not None:
        from ..elastic import select_width

        try:
            model = select_width(model, args.width)
        except ValueError as e:
            return cli_error(str(e))
        if pipe is not None:
            pipe.transformer = model
    if getattr(model, "_pocketdit_quantization", None) is not None:
        return cli_error(f"{args.checkpoint} is already quantized ({model._pocketdit_quantization['scheme']}); start from the float checkpoint")
    fp32 = model
    quantized = copy.deepcopy(model)
    t0 = time.perf_counter()
    config = args.config
    calibration = None
    guidance = None  # set when the calibration batches stack [conditional; unconditional]
    if args.scheme == "palettize4":
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
    try:
        report = quantize_(quantized, config, calibration=calibration, sensitivity_batches=args.sensitivity_batches)
    except ValueError as e:
        return cli_error(str(e))
    if args.finetune_steps:
        lr = args.lr if args.lr is not None else (3e-5 if args.finetune_indices else 1e-4)
        losses = self_distill_(
            quantized, fp32, calibration, steps=args.finetune_steps, lr=lr, train_luts=args.finetune_luts,
            train_indices=args.finetune_indices, guidance_scale=guidance,
        )
        print(f"self-distillation: {args.finetune_steps} steps, loss {losses[0]:.4g} -> {sum(losses[-10:]) / len(losses[-10:]):.4g}")
    quantized._pocketdit_quantization.setdefault("report", report.to_dict() if report else {})
    final = out
    with atomic_directory(final) as out:  # -o is replaced whole or not at all
        meta, summary = _write_outputs(args, pipe, fp32, quantized, out, report, config, calibration, guidance,
                                       t0, lr if args.finetune_steps else None)
    print(json.dumps(summary, indent=2))
    print(f"wrote {final} ({format_mib(meta['file_size_bytes'])} weights vs {format_mib(summary['fp32_param_bytes'])} fp32)")
    return 0


def _write_outputs(args, pipe, fp32, quantized, out, report, config, calibration, guidance, t0, lr):
    """The quantized model (a pipeline when the input was one), the --eval images and quantize_report.json."""
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
    return meta, summary
