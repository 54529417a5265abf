"""How far do small weight changes move a checkpoint's generated images? The noise floor of the image-PSNR
target for quantization.

    python bench/sampler_sensitivity.py runs/shapes_pixel32 --quantized pal4 int8 --write

Generates the same prompts and seeds as `pocketdit quantize --eval` (ShapesEval prompts, the pipeline's
sampler and guidance) with the fp32 weights, with the fp32 weights rounded to fp16 and to bf16 (and run in
fp32), and with each `--quantized` pipeline directory (`pocketdit quantize -o DIR`); prints pooled PSNR
(all images together), median and minimum per-image PSNR against fp32, and how many images fall below
25 dB. --write puts the table into BENCHMARKS.md, section "sampler-sensitivity".
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from common import load_average, setup_threads, versions
from report import command_line, machine_description, write_section


def rounded(model, dtype):
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    return model


def main(argv=None):
    from pocketdit.export.cli import _eval_prompts, _images, _load_pipeline
    from pocketdit.quantize import psnr

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="pipeline directory or training run (fp32)")
    ap.add_argument("--quantized", nargs="*", default=[], help="quantized pipeline directories to compare too")
    ap.add_argument("--images", type=int, default=50, help="evaluation prompts, one image each (same as quantize --eval-images)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the pipeline's)")
    ap.add_argument("--seed", type=int, default=0, help="as quantize --seed; images use seed + 1000 + i")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    threads = setup_threads(args.threads)
    started, load_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_average()

    pipe, fp32 = _load_pipeline(args.checkpoint)
    if pipe is None:
        raise SystemExit(f"error: {args.checkpoint} is a bare transformer; this bench needs a pipeline (text encoder + sampler)")
    steps = args.steps or pipe.default_steps
    prompts = _eval_prompts(args.images)
    variants = [("fp32 weights rounded to fp16", lambda: rounded(fp32, torch.float16)),
                ("fp32 weights rounded to bf16", lambda: rounded(fp32, torch.bfloat16))]
    for directory in args.quantized:
        variants.append((f"`{directory}`", lambda d=directory: _load_pipeline(d)[1]))

    rows = []
    with torch.no_grad():
        ref = _images(pipe, fp32, prompts, steps, args.seed + 1000)
        for name, build in variants:
            got = _images(pipe, build(), prompts, steps, args.seed + 1000)
            per = [psnr(got[i : i + 1], ref[i : i + 1], peak=2.0) for i in range(len(prompts))]
            row = (f"| {name} | {psnr(got, ref, peak=2.0):.2f} | {statistics.median(per):.2f} | {min(per):.1f} | "
                   f"{sum(p < 25 for p in per)} of {len(per)} |")
            print(row, flush=True)
            rows.append(row)

    markdown = "\n".join([
        "### Sampler sensitivity: image PSNR vs fp32 under small weight changes (cpu)",
        "",
        machine_description(),
        f"- {versions('torch')}; {threads} torch threads; started {started}, load average at start {load_start}",
        f"- checkpoint `{args.checkpoint}`; {len(prompts)} ShapesEval prompts (those `pocketdit quantize --eval` uses), "
        f"one image each, seeds {args.seed + 1000}+i, {steps} Euler steps, guidance {pipe.default_guidance}",
        "- pooled: PSNR of all images together; median / min: of the per-image PSNRs (peak-to-peak 2)",
        f"- command: `{command_line()}`",
        "",
        "| weights | pooled PSNR dB | median dB | min dB | images below 25 dB |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ])
    if args.write:
        write_section("sampler-sensitivity", markdown)
        print("wrote section 'sampler-sensitivity' of BENCHMARKS.md")


if __name__ == "__main__":
    main()
