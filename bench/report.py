"""Write a benchmark's markdown into its own section of BENCHMARKS.md (other sections are kept).

Each bench owns one section, delimited by `<!-- BEGIN name -->` / `<!-- END name -->`; rerunning a bench
replaces only its section, so tables from different benches (and machines) can live side by side.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery table below is written by a script in `bench/`; the command that made it is under it.\n"


def machine_description(threads: int | None = None) -> str:
    """The machine and versions; `threads`: the torch threads the timed code ran with (default: this process's)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    lines = [
        f"- machine: {cpu}, {os.cpu_count()} logical cores, torch threads {threads or torch.get_num_threads()}",
        f"- python {platform.python_version()}, torch {torch.__version__}",
    ]
    if torch.cuda.is_available():
        lines.append(f"- GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    return "\n".join(lines)


def write_section(name: str, markdown: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) section `name` of BENCHMARKS.md with `markdown`."""
    text = path.read_text() if path.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def command_line() -> str:
    return "python " + " ".join(sys.argv)
