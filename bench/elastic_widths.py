"""Per-width cost of an elastic supernet: parameters, FLOPs and latency per denoising step, each sliced width of
the supernet against the standalone model of the same width, timed interleaved in one process.

    python bench/elastic_widths.py --preset full --widths 0.375 0.5 1.0 --sizes 256 512 --write
    python bench/elastic_widths.py --shapes --write          # the shapes config (hidden 192) at 32 px, widths 0.5 / 1

The target (issue 16): a sliced width runs within 5% of its standalone model. Weights are random (timing
does not depend on them); fp32, batch 1, one forward without gradients.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt_ms, interleaved_timings, load_average, setup_threads, versions  # noqa: E402
from denoiser import pocketdit_inputs  # noqa: E402
from report import command_line, machine_description, write_section  # noqa: E402

from pocketdit import PocketDiT  # noqa: E402
from pocketdit.elastic import sub_config  # noqa: E402
from pocketdit.profiling import count_flops  # noqa: E402

SHAPES = dict(in_channels=3, patch_size=4, hidden_size=192, num_heads=12, num_kv_heads=6, head_dim=16, depth_down=2,
              depth_mid=2, depth_up=2, num_blocks=4, cross_attention_dim=192, text_embed_dims=(384,))


def _random(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _build(config):
    with torch.device("meta"):
        model = PocketDiT(**config)
    return _random(model.to_empty(device="cpu"))


def _flops(config, width, latent_shape):
    with torch.device("meta"):
        model = PocketDiT(**config)
        if width is not None:
            model.set_width(width)
        latent = torch.zeros(*latent_shape, device="meta")
        return count_flops(lambda: model(**pocketdit_inputs(model, latent))).total


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="full", help="the supernet's preset (default: full, 1.6B)")
    p.add_argument("--widths", type=float, nargs="+", default=[0.375, 0.5, 1.0], help="widths to time")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides in pixels (8x latents)")
    p.add_argument("--shapes", action="store_true", help="the shapes base's config at 32 px instead (widths 0.5, 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: as many as fit --budget)")
    p.add_argument("--budget", type=float, default=60.0, help="seconds of timing per size and width")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--write", action="store_true", help="write the table to BENCHMARKS.md")
    args = p.parse_args(argv)
    threads = setup_threads(args.threads)
    if args.shapes:
        base, widths, sizes, factor, name = dict(SHAPES), [0.5, 1.0], [32], 1, "shapes (hidden 192)"
    else:
        base, widths, sizes, factor, name = PocketDiT.preset_config(args.preset), args.widths, args.sizes, 8, args.preset
    # The supernet always holds its full width; --widths picks which widths are timed (1024² of the 1.6B full
    # width is minutes a call on a small CPU).
    config = {**base, "elastic_widths": sorted(set(widths) | {1.0})}
    channels = config.get("in_channels", 16)

    rows = []
    supernet = _build(config)
    for size in sizes:
        latent_shape = (1, channels, size // factor, size // factor)
        latent = torch.randn(*latent_shape, generator=torch.Generator().manual_seed(1))
        for w in widths:
            standalone = _build(sub_config(supernet.config, w))
            inputs = pocketdit_inputs(standalone, latent)

            supernet.set_width(w)  # once, as a user would: set_width walks every module

            def sliced():
                with torch.no_grad():
                    supernet(**inputs)

            def alone(model=standalone):
                with torch.no_grad():
                    model(**inputs)

            t = interleaved_timings({"sliced": sliced, "standalone": alone}, repeats=args.repeats, budget_s=args.budget)
            ms_s, ms_a = (statistics.median(t[k].seconds) * 1e3 for k in ("sliced", "standalone"))
            rows.append(dict(size=size, width=w, hidden=standalone.config.hidden_size,
                             params=standalone.num_parameters(), flops=_flops(config, w, latent_shape),
                             flops_alone=_flops(sub_config(supernet.config, w), None, latent_shape),
                             sliced=ms_s, alone=ms_a, rounds=len(t["sliced"].seconds)))
            print(rows[-1], flush=True)
            del standalone
            gc.collect()

    header = (
        f"Elastic widths of `{name}` (`{command_line()}`): {machine_description()}, {threads} threads, "
        f"{versions('torch')}, load {load_average()}. fp32, batch 1, one step without gradients; medians of "
        "interleaved rounds. `sliced` = the supernet at that width (weights sliced per call), `standalone` = a "
        "PocketDiT built at that width; FLOPs counted by torch's FlopCounterMode."
    )
    lines = [header, "", "| image | width | hidden | parameters | GFLOPs (sliced / standalone) | sliced ms | standalone ms "
             "| sliced / standalone | rounds |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['size']}² | {r['width']:g} | {r['hidden']} | {r['params'] / 1e6:.1f}M | {r['flops'] / 1e9:.1f} / "
            f"{r['flops_alone'] / 1e9:.1f} | {fmt_ms(r['sliced'])} | {fmt_ms(r['alone'])} | {r['sliced'] / r['alone']:.3f} "
            f"| {r['rounds']} |"
        )
    markdown = "\n".join(lines)
    print(markdown)
    if args.write:
        name = "elastic-widths-shapes" if args.shapes else f"elastic-widths-{args.preset}"
        if not args.shapes and sorted(args.sizes) != [256, 512]:
            name += "-" + "-".join(map(str, sorted(args.sizes)))  # its own section beside the 256/512 table
        write_section(name, markdown)


if __name__ == "__main__":
    main()
