"""Time to the first image: `pocketdit generate "..."` as a whole process, from interpreter start to the PNG written.

Each configuration runs `runs` times in fresh processes (interleaved, so a busy neighbour slows all alike), timed
by /usr/bin/time's wall clock when it is there (else by this script around the process); medians, the spread, and
the ratio to the eager PyTorch path are reported. Both paths write the same image (pocketdit.lite's parity check).

    python bench/first_image.py [-m MODEL] [--widths 1.0 0.5] [--runs 7] [--cpu 1] [--write]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import command_line, machine_description, write_section  # noqa: E402

PROMPT = "two red circles above a blue square"


def run_once(argv: list[str], cpu: int | None) -> float:
    prefix = ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []
    timer = shutil.which("time") or ("/usr/bin/time" if os.path.exists("/usr/bin/time") else None)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "t.txt"
        cmd = prefix + ([timer, "-f", "%e", "-o", str(out)] if timer else []) + argv
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        return float(out.read_text().strip().splitlines()[-1]) if timer else wall


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", default=None, help="model (default: the built-in default)")
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--cpu", type=int, default=None, help="pin every process to this core (taskset)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--widths", type=float, nargs="+", default=[1.0],
                   help="model widths to time (`pocketdit generate --model-width`; default: 1.0)")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args()
    exe = shutil.which("pocketdit") or sys.executable
    base = [exe] if exe.endswith("pocketdit") else [sys.executable, "-m", "pocketdit.cli"]
    runtimes = {"torch-free (onnxruntime + numpy)": "lite", "PyTorch eager": "torch"}
    configs = [(w, name, rt) for w in args.widths for name, rt in runtimes.items()]
    times: dict[tuple[float, str], list[float]] = {(w, name): [] for w, name, _ in configs}
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.runs + 1):  # the first round warms the page cache and is dropped
            for width, name, runtime in configs:
                argv = base + ["generate", PROMPT, "-o", str(Path(d) / f"{runtime}.png"), "--runtime", runtime,
                               "--threads", "1"]
                argv += ["--model-width", str(width)] if width != 1.0 else []
                argv += ["-m", args.model] if args.model else []
                argv += ["--steps", str(args.steps)] if args.steps else []
                t = run_once(argv, args.cpu)
                if i:
                    times[(width, name)].append(t)
    model = args.model or "the built-in default (`--model-width 0.5`: its half-width model)"
    lines = [
        "## First image: `pocketdit generate` as a whole process",
        "",
        f"Model: {model}; prompt {PROMPT!r}; one 32x32 image at the model's default steps and guidance; "
        f"{args.runs} runs each in fresh processes after one warm-up round, interleaved; wall clock by `/usr/bin/time` "
        "from interpreter start to the PNG written.",
        "",
        "| width | path | median s | min s | max s | vs eager |",
        "|---|---|---|---|---|---|",
    ]
    for (width, name), ts in times.items():
        med, ref = statistics.median(ts), statistics.median(times[(width, "PyTorch eager")])
        ratio = "ref" if name == "PyTorch eager" else f"{ref / med:.1f}x faster"
        lines.append(f"| {width} | {name} | {med:.2f} | {min(ts):.2f} | {max(ts):.2f} | {ratio} |")
    lines += ["", machine_description(threads=1), "", f"Command: `{command_line()}`"]  # each ran with --threads 1
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section("first-image", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
