"""How far do small weight changes move a checkpoint's generated images? The noise floor of the image-PSNR
target for quantization.

    python bench/sampler_sensitivity.py runs/shapes_pixel32 --quantized pal4 int8 --noise 0.005 0.01 0.02 --write

Generates the same prompts and seeds as `pocketdit quantize --eval` (ShapesEval prompts, the pipeline's
sampler and guidance) with the fp32 weights, with the fp32 weights rounded to fp16 and to bf16 (and run in
fp32), with Gaussian noise of `--noise` times each weight's standard deviation added to every Linear/Conv
weight, and with each `--quantized` pipeline directory (`pocketdit quantize -o DIR`); prints pooled PSNR
(all images together), median and minimum per-image PSNR against fp32, and how many images fall below
25 dB. `--seed-sets N` repeats the pooled number on N disjoint sets of seeds (the first is quantize's), which
shows how much of a difference between two rows is the choice of seeds. `--first-steps K ...` adds, for the first
`--quantized` directory, a row with its weights used only for the first K sampling steps (fp32 after) and one
with fp32 for the first K steps and its weights after: which part of the trajectory the damage comes from.
--write puts the table into BENCHMARKS.md, section "sampler-sensitivity".
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


def noisy(model, relative, seed=0):
    """Every Linear/Conv weight plus Gaussian noise of `relative` times that weight's standard deviation."""
    from pocketdit.quantize import palettizable_layers

    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in palettizable_layers(model).values():
            layer.weight.add_(torch.randn(layer.weight.shape, generator=g) * layer.weight.std() * relative)
    return model


class FirstSteps(torch.nn.Module):
    """A denoiser that runs `early` while the time is at or above `t_switch` and `late` below it."""

    def __init__(self, early, late, t_switch):
        super().__init__()
        self.early, self.late, self.t_switch = early, late, t_switch

    def forward(self, hidden_states, timestep, *args, **kwargs):
        model = self.early if float(timestep.flatten()[0]) >= self.t_switch else self.late
        return model(hidden_states, timestep, *args, **kwargs)

    def __getattr__(self, name):  # config, dtype, ...: the pipeline asks the transformer
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("late"), name)


def main(argv=None):
    from pocketdit import flow
    from pocketdit.quantize import psnr
    from pocketdit.quantize.cli import _eval_prompts, _images, _load_pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="pipeline directory or training run (fp32)")
    ap.add_argument("--quantized", nargs="*", default=[], help="quantized pipeline directories to compare too")
    ap.add_argument("--noise", nargs="*", type=float, default=[],
                    help="relative standard deviations of Gaussian weight noise to compare too (e.g. 0.01 = 1%% of each weight's std)")
    ap.add_argument("--first-steps", nargs="*", type=int, default=[],
                    help="for the first --quantized directory: rows with its weights for only the first K steps, and only after them")
    ap.add_argument("--seed-sets", type=int, default=1, help="disjoint seed sets to report the pooled PSNR on")
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
    for r in args.noise:
        variants.append((f"Gaussian noise, {100 * r:g}% of each weight's std", lambda r=r: noisy(fp32, r)))
    schedule = flow.timestep_schedule(steps, pipe.shift).tolist()
    for k in args.first_steps:
        if not 0 < k < steps:
            raise SystemExit(f"error: --first-steps {k} must be between 1 and {steps - 1} (the sampler takes {steps} steps)")
    for n, directory in enumerate(args.quantized):
        variants.append((f"`{directory}`", lambda d=directory: _load_pipeline(d)[1]))
        for k in args.first_steps if n == 0 else []:
            t_switch = (schedule[k - 1] + schedule[k]) / 2  # steps 1..k run at times >= schedule[k - 1]
            variants.append((f"`{directory}` for the first {k} of {steps} steps, fp32 after",
                             lambda d=directory, t=t_switch: FirstSteps(_load_pipeline(d)[1], fp32, t)))
            variants.append((f"fp32 for the first {k} of {steps} steps, `{directory}` after",
                             lambda d=directory, t=t_switch: FirstSteps(fp32, _load_pipeline(d)[1], t)))

    seeds = [args.seed + 1000 + 2000 * k for k in range(args.seed_sets)]  # 1000+i, 3000+i, ...: disjoint for <= 2000 images
    rows = []
    with torch.no_grad():
        refs = [_images(pipe, fp32, prompts, steps, s) for s in seeds]
        for name, build in variants:
            model = build()
            pooled, per = [], []
            for s, ref in zip(seeds, refs):
                got = _images(pipe, model, prompts, steps, s)
                pooled.append(psnr(got, ref, peak=2.0))
                per += [psnr(got[i : i + 1], ref[i : i + 1], peak=2.0) for i in range(len(prompts))]
            row = (f"| {name} | {' | '.join(f'{p:.2f}' for p in pooled)} | {statistics.median(per):.2f} | {min(per):.1f} | "
                   f"{sum(p < 25 for p in per)} of {len(per)} |")
            print(row, flush=True)
            rows.append(row)

    markdown = "\n".join([
        "### Sampler sensitivity: image PSNR vs fp32 under small weight changes (cpu)",
        "",
        machine_description(),
        f"- {versions('torch')}; {threads} torch threads; started {started}, load average at start {load_start}",
        f"- checkpoint `{args.checkpoint}`; {len(prompts)} ShapesEval prompts (those `pocketdit quantize --eval` uses), "
        f"one image each, seeds {' / '.join(f'{s}+i' for s in seeds)}, {steps} Euler steps, guidance {pipe.default_guidance}",
        "- pooled: PSNR of all images of one seed set together; median / min / count: over the per-image PSNRs of all "
        "seed sets (peak-to-peak 2)",
        f"- command: `{command_line()}`",
        "",
        "| weights | " + " | ".join(f"pooled dB, seeds {s}+i" for s in seeds) + " | median dB | min dB | images below 25 dB |",
        "|---|" + "---:|" * (len(seeds) + 3),
        *rows,
    ])
    if args.write:
        write_section("sampler-sensitivity", markdown)
        print("wrote section 'sampler-sensitivity' of BENCHMARKS.md")


if __name__ == "__main__":
    main()
