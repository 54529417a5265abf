"""Latency per image, in process: eager PyTorch pipeline and the torch-free path, each model at the steps and
guidance given, batch 1, one thread, median of `--runs` after a warm-up.

    python bench/image_latency.py checkpoints/shapes-base:28:3 checkpoints/shapes-4step:4:1 checkpoints/shapes-4step-0.5:4:1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine_description  # noqa: E402


def median_ms(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", help="PATH:STEPS:GUIDANCE")
    p.add_argument("--runs", type=int, default=20)
    args = p.parse_args()
    import torch

    from pocketdit import PocketDiTPipeline
    from pocketdit.lite import LitePipeline, has_lite

    torch.set_num_threads(1)
    prompt = "two red circles above a blue square"
    print("| model | steps | CFG | eager PyTorch ms/image | torch-free ms/image |\n|---|---|---|---|---|")
    for spec in args.models:
        path, steps, guidance = spec.rsplit(":", 2)
        steps, guidance = int(steps), float(guidance)
        pipe = PocketDiTPipeline.from_pretrained(path)
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            eager = median_ms(lambda: pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, seed=0), args.runs)
        lite = "-"
        if has_lite(path):
            lp = LitePipeline(path, threads=1)
            lite = f"{median_ms(lambda: lp(prompt, num_inference_steps=steps, guidance_scale=guidance, seed=0), args.runs):.1f}"
        print(f"| {path} | {steps} | {guidance:g} | {eager:.1f} | {lite} |")
    print("\n" + machine_description().replace("torch threads 1", "1 thread"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
