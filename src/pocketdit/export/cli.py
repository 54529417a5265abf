"""`pocketdit export | bench runtime`: argument parsing and reporting around pocketdit.export. Each command
takes the remaining argv and returns an exit code (`pocketdit quantize` lives in pocketdit.quantize.cli).

Every argument is checked before any work starts (types and ranges, the output directory, the optional
packages the format needs, the component paths, the resolution against the model); a bad one is one
`pocketdit: error: ...` line and exit code 2."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ..argtypes import (
    ArgumentParser, CLIError, check_output_dir, exit_code_command, finite_float, positive_float, positive_int, seed, time_shift,
)
from ..utils import atomic_directory, cli_error, format_mib
from .checks import check_component_options, check_input_path, load_input, require_export_modules

SCHEMES = ("palettize4", "int8", "8da4w")


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------------
def export_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="pocketdit export",
        description="Export text encoder, denoiser (one width, one step) and decoder as static-shape graphs, "
        "each checked against eager PyTorch (PSNR), plus a whole few-step generation.",
    )
    p.add_argument("checkpoint", help="pipeline directory, training run/checkpoint, or (quantized) PocketDiT directory")
    p.add_argument("--format", required=True, choices=["executorch", "coreml", "onnx"])
    p.add_argument("--resolution", type=positive_int, required=True,
                   help="image side in pixels (a size the model takes; an invalid one names the nearest valid ones)")
    p.add_argument("--width", type=positive_float, default=None,
                   help="width of an elastic supernet to export, e.g. 0.5 (one of its elastic_widths; default: full)")
    p.add_argument("--quantize", choices=list(SCHEMES), default=None, help="quantize before exporting")
    p.add_argument("-o", "--output", default=None,
                   help="output directory (default: exports/<format>); must be new or empty unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty output directory (a previous export's included)")
    p.add_argument("--text-encoder", default=None,
                   help="'minilm', a local encoder directory or 'none' (default: the checkpoint's)")
    p.add_argument("--autoencoder", default=None, help="'pixel', a local directory or 'none' (default: the checkpoint's)")
    p.add_argument("--steps", type=positive_int, default=4, help="steps of the end-to-end parity check")
    p.add_argument("--shift", type=time_shift, default=None,
                   help="timestep shift (default: the pipeline's)")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--min-psnr", type=finite_float(), default=35.0, help="parity threshold in dB (default: 35)")
    p.add_argument("--seed", type=seed, default=0)
    return p


@exit_code_command
def export_command(argv: Sequence[str]) -> int:
    args = export_parser().parse_args(list(argv))
    # everything that needs no model first: options, paths, packages
    check_component_options(args.text_encoder, args.autoencoder)
    source = check_input_path(args.checkpoint)
    out = Path(args.output or f"exports/{args.format}")
    if _same_dir(out, source):
        raise CLIError(f"-o {out}: is the input checkpoint; choose another directory")
    check_output_dir(out, "-o", overwrite=args.overwrite)
    if args.quantize is not None:
        from . import UNSUPPORTED

        if (args.format, args.quantize) in UNSUPPORTED:
            raise CLIError(f"--quantize {args.quantize} has no {args.format} lowering here; use --quantize "
                           f"{UNSUPPORTED[args.format, args.quantize]}")
    require_export_modules(args.format, args.quantize,
                           f"export --format {args.format}" + (f" --quantize {args.quantize}" if args.quantize else ""))
    from . import ExportConfig, ParityError, check_resolution, effective_scheme, export_pipeline

    try:
        config = ExportConfig(
            format=args.format, resolution=args.resolution, width=args.width, quantize=args.quantize,
            batch_size=args.batch_size, num_steps=args.steps, shift=args.shift, min_psnr=args.min_psnr, seed=args.seed,
        )
    except ValueError as e:
        raise CLIError(str(e)) from None
    parts = load_input(args.checkpoint, args.text_encoder, args.autoencoder)
    # what needs the model, before the work: the scheme it already has, the resolution, the width
    try:
        effective_scheme(parts.transformer, args.quantize, args.format)
    except ValueError as e:
        raise CLIError(str(e)) from None
    try:
        check_resolution(parts, args.resolution)
    except ValueError as e:
        raise CLIError(f"--resolution: {e}") from None
    if args.width is not None:
        from ..elastic import check_selectable

        try:
            check_selectable(parts.transformer, args.width)
        except ValueError as e:
            raise CLIError(str(e)) from None
    try:
        with atomic_directory(out) as staging:  # -o is replaced whole or not at all (a failed check included)
            result = export_pipeline(parts, staging, config)
    except ParityError as e:
        return cli_error(f"parity check failed: {e}")
    for name, par in result.parity.items():
        size = f", {format_mib(result.sizes[name])}" if name in result.sizes else ""
        print(f"{name:>13}: PSNR {par.psnr:.1f} dB vs eager ({par.runtime}){size}")
    print(f"wrote {out} (manifest {out / 'export.json'})")
    return 0


# ----------------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------------
@exit_code_command
def bench_command(argv: Sequence[str]) -> int:
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: pocketdit bench runtime CHECKPOINT [options]   (see `pocketdit bench runtime --help`)")
        return 0
    if not argv:
        return cli_error("bench: name the benchmark: `pocketdit bench runtime CHECKPOINT [options]` "
                         "(see `pocketdit bench runtime --help`)")
    if argv[0] != "runtime":
        return cli_error(f"unknown bench {argv[0]!r}; available: runtime")
    from .runtime_bench import main

    return main(argv[1:])
