"""Runtime benchmark: end-to-end generation in eager PyTorch, ExecuTorch (XNNPACK) and onnxruntime on this CPU.

    python bench/runtime.py runs/shapes_pixel32 --steps 4 --runs 5 --write

Thin wrapper over `pocketdit bench runtime` (pocketdit/export/runtime_bench.py); --write puts the table
into BENCHMARKS.md, section "runtime".
"""

import sys

from pocketdit.export.runtime_bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
