"""`pocketdit bench runtime`: end-to-end generation latency in each runtime that runs here, beside eager PyTorch.

For every configuration (eager PyTorch fp32 / torchao, ExecuTorch XNNPACK fp32 / 8da4w, onnxruntime fp32 /
int8) the graphs are exported once (`pocketdit.export`, parity-checked), then a fresh worker process loads
them and times `runs` whole generations: text encoder + N denoiser steps + decoder. Reported: median
latency per component and end to end, peak resident memory of the worker (and its growth over the
interpreter with all libraries imported), and file sizes. Every configuration runs in its own process so
its memory high-water mark is its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ..argtypes import (
    ArgumentParser, CLIError, check_output_dir, check_output_file, exit_code_command, non_negative_int, positive_float,
    positive_int, threads,
)

CONFIGS = {
    # name: (runtime, format or None for eager, quantization scheme or None)
    "eager-fp32": ("pytorch eager", None, None),
    "eager-int8": ("pytorch eager + torchao int8 weight-only", None, "int8"),
    "eager-8da4w": ("pytorch eager + torchao 8da4w", None, "8da4w"),
    "executorch-fp32": ("executorch (xnnpack)", "executorch", None),
    "executorch-8da4w": ("executorch (xnnpack) 8da4w", "executorch", "8da4w"),
    "onnx-fp32": ("onnxruntime", "onnx", None),
    "onnx-int8": ("onnxruntime int8 (dynamic)", "onnx", "int8"),
}
DEFAULT_CONFIGS = ("eager-fp32", "eager-int8", "onnx-fp32", "onnx-int8", "executorch-fp32", "executorch-8da4w")


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="pocketdit bench runtime", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pipeline directory, training run/checkpoint or PocketDiT directory")
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="image side (default: the pipeline's default size; must be a size the model takes)")
    p.add_argument("--steps", type=positive_int, default=4)
    p.add_argument("--runs", type=positive_int, default=5, help="timed generations per configuration (median reported)")
    p.add_argument("--warmup", type=non_negative_int, default=1)
    p.add_argument("--width", type=positive_float, default=None,
                   help="time this width of an elastic supernet, e.g. 0.5 (default: full)")
    p.add_argument("--threads", type=threads, default=None, help="CPU threads for every runtime (default, or 0: all cores)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"comma list from {sorted(CONFIGS)}; each needs only its own runtime's packages")
    p.add_argument("--export-dir", default="exports/bench",
                   help="where exported graphs are written / reused (one folder per configuration, holding only "
                        "what `pocketdit export` writes)")
    p.add_argument("--text-encoder", default=None, help="'minilm', a local encoder directory or 'none' (default: the checkpoint's)")
    p.add_argument("--autoencoder", default=None, help="'pixel', a local directory or 'none' (default: the checkpoint's)")
    p.add_argument("--write", action="store_true",
                   help="write the table into BENCHMARKS.md (section 'runtime'; needs a source checkout)")
    p.add_argument("--json", default=None, help="also write the raw results to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def _rss_mib() -> float:
    """Peak resident memory of this process image in MiB.

    VmHWM (Linux) belongs to the address space, so it starts fresh at exec; getrusage's ru_maxrss would
    carry over the parent's peak into a freshly started worker.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------------------
# Worker: one configuration in its own process
# ----------------------------------------------------------------------------------------------------
def _worker(spec: dict) -> dict:
    import torch

    from . import load_parts, load_runner
    from .parity import generate

    threads = spec["threads"]
    torch.set_num_threads(threads)
    # import every installed runtime first so the baseline is the same for all configurations; a configuration
    # needs only its own (checked by the driver before it starts)
    if importlib.util.find_spec("executorch") is not None:
        import executorch.runtime  # noqa: F401

        from .executorch import set_threads

        set_threads(threads)  # ExecuTorch's pool (XNNPACK) otherwise takes every core, whatever --threads says
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime  # noqa: F401

    baseline = _rss_mib()
    manifest = None
    if spec["format"] is None:
        from ..elastic import select_width
        from . import _apply_quantization, build_specs, ExportConfig

        parts = load_parts(spec["checkpoint"], spec.get("text_encoder"), spec.get("autoencoder"))
        model, _ = _apply_quantization(select_width(parts.transformer, spec.get("width")), spec["scheme"], "eager",
                                       progress=False)
        specs = build_specs(parts, ExportConfig(format="onnx", resolution=spec["resolution"]), model)
        graphs = {n: s.module for n, s in specs.items()}
        den_inputs = specs["denoiser"].example_inputs
        text_inputs = specs["text_encoder"].example_inputs if "text_encoder" in specs else None
        sizes = {}
        if "text_encoder" in specs:
            sizes["text_encoder"] = sum(p.numel() * p.element_size() for p in specs["text_encoder"].module.parameters())
        sizes["denoiser"] = _state_bytes(model)
        if "decoder" in specs:
            sizes["decoder"] = sum(p.numel() * p.element_size() for p in specs["decoder"].module.parameters())
    else:
        out = Path(spec["export_dir"])
        manifest = json.loads((out / "export.json").read_text())
        graphs = {n: load_runner(spec["format"], out / g["file"], threads=threads) for n, g in manifest["graphs"].items()}
        sizes = {n: g["bytes"] for n, g in manifest["graphs"].items()}
        den = manifest["graphs"]["denoiser"]["inputs"]
        den_inputs = tuple(_example(i) for i in den)
        text_inputs = tuple(_example(i) for i in manifest["graphs"]["text_encoder"]["inputs"]) if "text_encoder" in graphs else None
    k = (len(den_inputs) - 2) // 2
    noise = torch.randn(den_inputs[0].shape, generator=torch.Generator().manual_seed(0))
    timings = {"text_encoder": [], "denoiser": [], "decoder": [], "total": []}

    def timed(name, fn):
        def call(*a):
            t0 = time.perf_counter()
            y = fn(*a)
            timings[name].append(time.perf_counter() - t0)
            return y

        return call

    with torch.no_grad():
        for run in range(spec["warmup"] + spec["runs"]):
            if run == spec["warmup"]:
                timings = {key: [] for key in timings}
            t0 = time.perf_counter()
            if text_inputs is not None:
                states = [timed("text_encoder", graphs["text_encoder"])(*text_inputs)]
                masks = [text_inputs[1].float()]
            else:
                states, masks = list(den_inputs[2 : 2 + k]), list(den_inputs[2 + k :])
            decode = timed("decoder", graphs["decoder"]) if "decoder" in graphs else None
            generate(timed("denoiser", graphs["denoiser"]), noise, states, masks, spec["steps"], 1.0, decode)
            timings["total"].append(time.perf_counter() - t0)
    peak = _rss_mib()
    med = {n: statistics.median(v) * 1000 for n, v in timings.items() if v}
    return {"latency_ms": med, "peak_rss_mib": peak, "rss_growth_mib": peak - baseline, "bytes": sizes,
            "latent_shape": list(den_inputs[0].shape), "threads": threads}


def _state_bytes(model) -> int:
    total = 0
    for t in model.state_dict().values():
        try:
            total += sum(x.numel() * x.element_size() for x in _plain_tensors(t))
        except Exception:
            total += t.numel() * 4
    return total


def _plain_tensors(t):
    names = getattr(t, "tensor_data_names", None)
    if names:  # torchao tensor subclass: count its stored components
        return [getattr(t, n) for n in names if getattr(t, n, None) is not None]
    return [t]


def _example(info: dict):
    import torch

    dtype = getattr(torch, info["dtype"])
    shape = info["shape"]
    g = torch.Generator().manual_seed(1)
    if info["name"] in ("attention_mask",) or info["name"].startswith("text_mask"):
        n = shape[-1]
        return (torch.arange(n)[None] < max(2, n // 2)).to(dtype).expand(*shape).contiguous()
    if info["name"] == "input_ids":
        return torch.randint(1, 1000, shape, generator=g, dtype=torch.int64).to(dtype)
    if info["name"] == "timestep":
        return torch.rand(shape, generator=g)
    return torch.randn(shape, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------
def _ensure_export(args, name: str, fmt: str, scheme: Optional[str], resolution: int) -> Path:
    from . import ExportConfig, export_pipeline, load_parts

    out = Path(args.export_dir) / name
    manifest = out / "export.json"
    if manifest.is_file() and args.text_encoder is None and args.autoencoder is None:  # (overrides: export anew)
        try:
            m = json.loads(manifest.read_text())
            same = (m["source"] == str(Path(args.checkpoint)) and m["format"] == fmt and m["config"]["resolution"] == resolution
                    and m["config"]["quantize"] == scheme and m["config"]["num_steps"] == args.steps
                    and m["config"].get("width") == args.width)
        except (ValueError, KeyError, TypeError):
            same = False  # a damaged manifest: export again
        if same:
            print(f"[{name}] reusing {out}")
            return out
    print(f"[{name}] exporting to {out} ...")
    parts = load_parts(args.checkpoint, args.text_encoder, args.autoencoder)
    cfg = ExportConfig(format=fmt, resolution=resolution, width=args.width, quantize=scheme, num_steps=args.steps)
    result = export_pipeline(parts, out, cfg)
    for g, par in result.parity.items():
        print(f"[{name}]   {g}: PSNR {par.psnr:.1f} dB")
    return out


def _table(results: dict, args, resolution: int) -> str:
    base = results.get("eager-fp32")
    rows = [
        "| configuration | text encoder ms | denoiser ms/step | decoder ms | end-to-end ms | step vs eager fp32 | peak RSS MiB (growth) | files MiB | image PSNR vs eager dB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lat = r["latency_ms"]
        ratio = "1.00x" if name == "eager-fp32" else (f"{base['latency_ms']['denoiser'] / lat['denoiser']:.2f}x faster" if base else "-")
        if base and name != "eager-fp32" and lat["denoiser"] > base["latency_ms"]["denoiser"]:
            ratio = f"{lat['denoiser'] / base['latency_ms']['denoiser']:.2f}x slower"
        fmt = lambda key: f"{lat[key]:.1f}" if key in lat else "-"
        size = sum(r["bytes"].values()) / 2**20
        rows.append(
            f"| {CONFIGS[name][0]} | {fmt('text_encoder')} | {lat['denoiser']:.2f} | {fmt('decoder')} | {lat['total']:.1f} | "
            f"{ratio} | {r['peak_rss_mib']:.0f} ({r['rss_growth_mib']:.0f}) | {size:.2f} | {r.get('image_psnr', '-')} |"
        )

    lines = [
        "## Runtime: end-to-end generation on this CPU",
        "",
        f"Checkpoint `{args.checkpoint}`, {resolution}x{resolution} px, latents {tuple(next(iter(results.values()))['latent_shape'])}, "
        f"{args.steps} Euler steps, batch 1, {next(iter(results.values()))['threads']} threads, median of {args.runs} generations "
        f"after {args.warmup} warm-up. Each configuration runs in its own process; RSS growth is over an interpreter "
        "with torch, ExecuTorch and onnxruntime imported. Files: the exported graphs (eager: the in-memory weights). "
        "Image PSNR: the exported pipeline's image vs eager fp32 at export time (parity check; eager int8 rows are "
        "not parity-checked).",
        "",
        *rows,
    ]
    return "\n".join(lines)


def _check(args) -> list:
    """Every argument, before any export or timing: the configurations and their packages, the paths, the
    checkpoint. Returns the configuration names, in order, once each."""
    from . import export_file_names
    from .checks import check_component_options, check_input_path, require_export_modules

    names = list(dict.fromkeys(c.strip() for c in args.configs.split(",") if c.strip()))
    if not names:
        raise CLIError(f"--configs {args.configs!r}: no configuration; choose from {', '.join(sorted(CONFIGS))}")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise CLIError(f"--configs: unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(sorted(CONFIGS))}")
    for name in names:
        _, fmt, scheme = CONFIGS[name]
        require_export_modules(fmt, scheme, f"bench runtime configuration {name}")
    check_component_options(args.text_encoder, args.autoencoder)
    check_input_path(args.checkpoint)
    export_root = Path(args.export_dir)
    if export_root.exists() and not export_root.is_dir():
        raise CLIError(f"--export-dir {export_root}: is a file, not a directory")
    for name in names:
        fmt = CONFIGS[name][1]
        folder = export_root / name
        if fmt is None:
            continue
        # a configuration's folder holds its export (reused, or rewritten) and nothing else
        if folder.is_dir():
            others = sorted(p.name for p in folder.iterdir() if p.name not in export_file_names(fmt))
            if others:
                shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
                raise CLIError(f"--export-dir {export_root}: {folder} holds files that are not a {fmt} export ({shown}); "
                               "bench reuses or rewrites only its own exports there, so choose another --export-dir")
        check_output_dir(folder, "--export-dir", overwrite=True)
    if args.json:
        check_output_file(args.json, "--json")
    if args.write:
        report = Path(__file__).resolve().parents[3] / "bench" / "report.py"
        if not report.is_file():
            raise CLIError("--write needs a source checkout of PocketDiT (bench/report.py writes BENCHMARKS.md); "
                           "use --json to keep the results instead")
        check_output_file(report.parents[1] / "BENCHMARKS.md", "--write")
    return names


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(list(argv))
    if args.worker:
        spec = json.loads(args.worker)
        print("RESULT " + json.dumps(_worker(spec)))
        return 0
    names = _check(args)
    from . import check_resolution
    from .checks import load_input

    parts = load_input(args.checkpoint, args.text_encoder, args.autoencoder)
    resolution = args.resolution or getattr(parts, "default_size", None) or 32
    try:
        check_resolution(parts, resolution)
    except ValueError as e:
        option = "--resolution" if args.resolution else "the checkpoint's default resolution (pass --resolution)"
        raise CLIError(f"{option}: {e}") from None
    if args.width is not None:
        from ..elastic import check_selectable

        try:
            check_selectable(parts.transformer, args.width)
        except ValueError as e:
            raise CLIError(str(e)) from None
    threads = args.threads or os.cpu_count() or 1
    del parts
    results = {}
    for name in names:
        runtime, fmt, scheme = CONFIGS[name]
        export_dir = None
        psnr_img = "-"
        if fmt is not None:
            export_dir = _ensure_export(args, name, fmt, scheme, resolution)
            par = json.loads((export_dir / "export.json").read_text())["image_parity"]
            psnr_img = "inf" if par["psnr_db"] is None else f"{par['psnr_db']:.1f}"
        spec = dict(checkpoint=args.checkpoint, format=fmt, scheme=scheme, export_dir=str(export_dir) if export_dir else None,
                    resolution=resolution, steps=args.steps, runs=args.runs, warmup=args.warmup, threads=threads,
                    text_encoder=args.text_encoder, autoencoder=args.autoencoder, width=args.width)
        print(f"[{name}] timing {args.runs} generations ...")
        proc = subprocess.run([sys.executable, "-m", "pocketdit.export.runtime_bench", args.checkpoint, "--worker", json.dumps(spec)],
                              capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"pocketdit: error: bench runtime: the worker for {name} failed (exit {proc.returncode}); its "
                  f"stderr ends with:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        results[name] = json.loads(line[-1][len("RESULT "):])
        results[name]["image_psnr"] = psnr_img if fmt is not None else ("ref" if name == "eager-fp32" else "-")
        lat = results[name]["latency_ms"]
        print(f"[{name}] denoiser {lat['denoiser']:.2f} ms/step, end-to-end {lat['total']:.1f} ms, peak RSS {results[name]['peak_rss_mib']:.0f} MiB")
        _report(results, args, resolution, final=name == names[-1])
    return 0


def _report(results: dict, args, resolution: int, final: bool) -> None:
    """Print / write the table (after every configuration, so a long run leaves what it measured)."""
    table = _table(results, args, resolution)
    if final:
        print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
        from bench.report import command_line, machine_description, write_section

        write_section("runtime", table + "\n\n" + machine_description() + "\n\nCommand: `" + command_line() + "`\n")
        if final:
            print("wrote BENCHMARKS.md section 'runtime'")


if __name__ == "__main__":
    sys.exit(exit_code_command(main)(sys.argv[1:]))
