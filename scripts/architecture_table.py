"""Fill the preset table of docs/architecture.md from the code (parameters, FLOPs, tokens per stage).

    python scripts/architecture_table.py          # rewrites the table between the markers
    python scripts/architecture_table.py --check  # exits 1 if the committed table is stale

Models are built on the meta device, so this takes seconds and no memory.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from pocketdit.model import PRESETS, PocketDiT
from pocketdit.profiling import num_parameters, pocketdit_step_flops

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
BEGIN, END = "<!-- BEGIN preset-table -->", "<!-- END preset-table -->"
VAE_FACTOR = 8  # the paper's Qwen-Image VAE: 8x spatial downsampling, 16 channels
PAPER = {"full": "1.6B", "small": "0.4B", "tiny": "0.3B", "nano": "-"}


def table() -> str:
    rows = [
        "| preset | width | heads (q/kv) | depth D/M/U | params | paper | GFLOPs/step 512² | attention share 512² "
        "| GFLOPs/step 1024² | attention share 1024² | tokens D/U, M at 512² | at 1024² |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("full", "small", "tiny", "nano"):
        with torch.device("meta"):
            model = PocketDiT.from_preset(name)
        c = model.config
        row = [
            name, str(c.hidden_size), f"{c.num_heads}/{c.num_kv_heads}", f"{c.depth_down}/{c.depth_mid}/{c.depth_up}",
            f"{num_parameters(model) / 1e6:,.1f}M", PAPER[name],
        ]
        tokens = []
        for image in (512, 1024):
            latent = image // VAE_FACTOR
            if name == "nano":  # nano is a test model for 16x16 latents; report it at that size only
                row += ["-", "-"]
                tokens.append("-")
                continue
            f = pocketdit_step_flops(model, latent, latent)
            row += [f"{f.total / 1e9:,.0f}", f"{100 * f.attention / f.total:.1f}%"]
            n = (latent // c.patch_size) ** 2
            tokens.append(f"{n}, {n // 4}")
        rows.append("| " + " | ".join(row + tokens) + " |")
    rows.append("")
    rows.append(
        "FLOPs count one forward pass (batch 1, one 77-token prompt per text encoder) with "
        "`torch.utils.flop_counter` on the meta device; a multiply-add is 2 FLOPs. Latents are the image size / 8 "
        "(the paper's Qwen-Image VAE), patch size 2. Written by `python scripts/architecture_table.py`."
    )
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if docs/architecture.md is out of date")
    args = parser.parse_args(argv)
    text = DOC.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        print(f"{DOC} has no {BEGIN} ... {END} markers", file=sys.stderr)
        return 1
    new = pattern.sub(lambda _: f"{BEGIN}\n{table()}\n{END}", text)
    if args.check:
        if new != text:
            print("docs/architecture.md preset table is stale: run python scripts/architecture_table.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
