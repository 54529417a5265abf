"""`pocketdit export | bench runtime`: argument parsing and reporting around pocketdit.export. Each command
takes the remaining argv and returns an exit code (`pocketdit quantize` lives in pocketdit.quantize.cli)."""

from __future__ import annotations

import argparse
from typing import Sequence

from ..utils import cli_error, format_mib


# ----------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------
def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pocketdit export",
        description="Export text encoder, denoiser (one width, one step) and decoder as static-shape graphs, "
        "each checked against eager PyTorch (PSNR), plus a whole few-step generation.",
    )
    p.add_argument("checkpoint", help="pipeline directory, training run/checkpoint, or (quantized) PocketDiT directory")
    p.add_argument("--format", required=True, choices=["executorch", "coreml", "onnx"])
    p.add_argument("--resolution", type=int, required=True, help="image side in pixels")
    p.add_argument("--width", type=int, default=None, help="elastic width (default: the checkpoint's hidden size)")
    p.add_argument("--quantize", choices=["palettize4", "int8", "8da4w"], default=None, help="quantize before exporting")
    p.add_argument("-o", "--output", default=None, help="output directory (default: exports/<format>)")
    p.add_argument("--text-encoder", default=None, help="'minilm', a local encoder directory or 'none' (default: the checkpoint's)")
    p.add_argument("--autoencoder", default=None, help="'pixel', a local directory or 'none' (default: the checkpoint's)")
    p.add_argument("--steps", type=int, default=4, help="steps of the end-to-end parity check")
    p.add_argument("--shift", type=float, default=None, help="timestep shift (default: the pipeline's)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--min-psnr", type=float, default=35.0)
    p.add_argument("--seed", type=int, default=0)
    return p


def export_command(argv: Sequence[str]) -> int:
    args = export_parser().parse_args(list(argv))
    from . import ExportConfig, ParityError, export_pipeline, load_parts

    try:
        config = ExportConfig(
            format=args.format, resolution=args.resolution, width=args.width, quantize=args.quantize,
            batch_size=args.batch_size, num_steps=args.steps, shift=args.shift, min_psnr=args.min_psnr, seed=args.seed,
        )
        parts = load_parts(args.checkpoint, args.text_encoder, args.autoencoder)
        result = export_pipeline(parts, args.output or f"exports/{args.format}", config)
    except ParityError as e:
        return cli_error(f"parity check failed: {e}")
    except (FileNotFoundError, ValueError) as e:
        return cli_error(str(e))
    for name, par in result.parity.items():
        size = f", {format_mib(result.sizes[name])}" if name in result.sizes else ""
        print(f"{name:>13}: PSNR {par.psnr:.1f} dB vs eager ({par.runtime}){size}")
    print(f"wrote {result.out_dir} (manifest {result.out_dir / 'export.json'})")
    return 0


# ----------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------
def bench_command(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: pocketdit bench runtime CHECKPOINT [options]   (see `pocketdit bench runtime --help`)")
        return 0 if argv else 2
    if argv[0] != "runtime":
        return cli_error(f"unknown bench {argv[0]!r}; available: runtime")
    from .runtime_bench import main

    return main(argv[1:])
