"""One denoising step of PocketDiT against peer denoisers; writes BENCHMARKS.md section "denoiser".

    python bench/denoiser.py                                    # CPU fp32: the full grid, writes BENCHMARKS.md
    python bench/denoiser.py --resolutions 512 --models "PocketDiT small" "PocketDiT small, dense" --no-write
    python bench/denoiser.py --device cuda --dtype bf16 --section denoiser-gpu

Every model runs in this process with random weights (normal, std 0.02), batch 1, the same threads and
dtype. Peers are diffusers' own classes built from their published configs (listed in the output).
Latents: PocketDiT and PixArt-Sigma use an 8x VAE (16 and 4 channels), SANA its 32x DC-AE (32 channels),
so at the same image size SANA's transformer sees 16x fewer tokens.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode` on the meta device (no weights, no time), split
into linear layers (mm/addmm/conv) and attention (all batched matmuls: self- and cross-attention scores and
weighted sums; SANA's linear attention included). "FLOP bound" for PocketDiT `small` is FLOPs(small with
dense attention) / FLOPs(small): the speed-up ASSA would give if time followed FLOPs.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    _LiveTensorBytes,
    fmt_bytes,
    interleaved_timings,
    load_average,
    parse_dtype,
    setup_threads,
    versions,
)
from report import command_line, machine_description, write_section  # noqa: E402

from pocketdit import PocketDiT  # noqa: E402
from pocketdit.profiling import count_flops  # noqa: E402

# Published transformer configs (diffusers layout), reconstructed from the models' config.json files.
PIXART_SIGMA_600M = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    cross_attention_dim=1152, attention_bias=True, sample_size=128, patch_size=2, activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    interpolation_scale=2, use_additional_conditions=False, caption_channels=4096,
)
SANA_600M = dict(
    in_channels=32, out_channels=32, num_attention_heads=36, attention_head_dim=32, num_layers=28,
    num_cross_attention_heads=16, cross_attention_head_dim=72, cross_attention_dim=1152, caption_channels=2304,
    mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
)
SANA_1600M = dict(
    in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
    num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
    mlp_ratio=2.5, attention_bias=False, sample_size=32, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
)
POCKETDIT_TEXT_TOKENS = 77  # per text encoder (TinyCLIP's context; the Gemma prompt padded to the same)
PEER_TEXT_TOKENS = 300  # PixArt-Sigma (T5) and SANA (Gemma-2) max caption length


@dataclass
class Spec:
    name: str
    build: Callable[[], torch.nn.Module]
    latent_channels: int
    downsample: int
    inputs: Callable  # (model, latent (B,C,h,w)) -> kwargs for model(**kwargs)
    config: str


def pocketdit_inputs(model, latent):
    b = latent.shape[0]
    text = [torch.zeros(b, POCKETDIT_TEXT_TOKENS, d, device=latent.device, dtype=latent.dtype) for d in model.config.text_embed_dims]
    t = torch.full((b,), 0.5, device=latent.device, dtype=latent.dtype)
    return dict(hidden_states=latent, timestep=t, encoder_hidden_states=text)


def diffusers_inputs(caption_channels, extra=None):
    def make(model, latent):
        b = latent.shape[0]
        kw = dict(
            hidden_states=latent,
            encoder_hidden_states=torch.zeros(b, PEER_TEXT_TOKENS, caption_channels, device=latent.device, dtype=latent.dtype),
            encoder_attention_mask=torch.ones(b, PEER_TEXT_TOKENS, device=latent.device, dtype=latent.dtype),
            timestep=torch.full((b,), 500, device=latent.device, dtype=torch.long),
        )
        kw.update(extra or {})
        return kw

    return make


def specs() -> dict[str, Spec]:
    from diffusers import PixArtTransformer2DModel, SanaTransformer2DModel

    def pocket(preset, **over):
        cfg = PocketDiT.preset_config(preset, **over)
        return Spec(
            f"PocketDiT {preset}" + (", dense" if over else ""),
            lambda: PocketDiT(**cfg),
            cfg.get("in_channels", 16),
            8,
            pocketdit_inputs,
            f"PocketDiT.from_preset({preset!r}{', ' + ', '.join(f'{k}={v!r}' for k, v in over.items()) if over else ''})",
        )

    out = [
        pocket("tiny"),
        pocket("small"),
        pocket("full"),
        pocket("small", attention_types="dense"),
        Spec("PixArt-Sigma 0.6B", lambda: PixArtTransformer2DModel(**PIXART_SIGMA_600M), 4, 8,
             diffusers_inputs(4096, {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}),
             f"PixArtTransformer2DModel({PIXART_SIGMA_600M})"),
        Spec("SANA 0.6B", lambda: SanaTransformer2DModel(**SANA_600M), 32, 32, diffusers_inputs(2304),
             f"SanaTransformer2DModel({SANA_600M})"),
        Spec("SANA 1.6B", lambda: SanaTransformer2DModel(**SANA_1600M), 32, 32, diffusers_inputs(2304),
             f"SanaTransformer2DModel({SANA_1600M})"),
    ]
    return {s.name: s for s in out}


def meta_flops(spec: Spec, resolution: int):
    with torch.device("meta"):
        model = spec.build()
    params = sum(p.numel() for p in model.parameters())
    side = resolution // spec.downsample
    latent = torch.zeros(1, spec.latent_channels, side, side, device="meta")
    flops = count_flops(lambda: model(**spec.inputs(model, latent)))
    return params, flops


def materialize(spec: Spec, device, dtype):
    """Build on meta, allocate, fill with random weights: fast, and the same recipe for every model."""
    with torch.device("meta"):
        model = spec.build()
    model = model.to_empty(device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    # Buffers that are not weights (PixArt's sin-cos position table) must be recomputed, not random.
    for module in model.modules():
        if hasattr(module, "pos_embed") and isinstance(getattr(module, "pos_embed"), torch.Tensor):
            from diffusers.models.embeddings import get_2d_sincos_pos_embed

            grid = int(module.pos_embed.shape[1] ** 0.5)
            table = get_2d_sincos_pos_embed(module.pos_embed.shape[-1], grid, base_size=module.base_size,
                                            interpolation_scale=module.interpolation_scale, output_type="pt")
            module.pos_embed.copy_(table.float().unsqueeze(0))
    return model.to(dtype).eval()


def step_fn(model, spec, resolution, device, dtype):
    side = resolution // spec.downsample
    latent = torch.randn(1, spec.latent_channels, side, side, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    kwargs = spec.inputs(model, latent)

    def step():
        with torch.no_grad():
            return model(**kwargs)

    return step


def measure_group(names, all_specs, resolution, args, device, dtype):
    """Time the models in `names` interleaved; returns {name: row}."""
    models, steps, rows = {}, {}, {}
    for name in names:
        spec = all_specs[name]
        params, flops = meta_flops(spec, resolution)
        t0 = time.time()
        models[name] = materialize(spec, device, dtype)
        steps[name] = step_fn(models[name], spec, resolution, device, dtype)
        tokens = (resolution // spec.downsample // (1 if spec.name.startswith("SANA") else 2)) ** 2
        rows[name] = dict(name=name, resolution=resolution, params=params, flops=flops, tokens=tokens, build_s=time.time() - t0)
    # The warm-up call runs under the live-tensor counter: it gives peak activation memory and is not timed.
    for name in names:
        mode = _LiveTensorBytes()
        start = time.perf_counter()
        with mode:
            steps[name]()
        rows[name]["warmup_s"] = time.perf_counter() - start
        rows[name]["peak_act"] = mode.peak
        rows[name]["weights"] = sum(p.numel() * p.element_size() for p in models[name].parameters())
    per_round = sum(r["warmup_s"] for r in rows.values())
    repeats = args.repeats_now or max(args.min_repeats, min(args.max_repeats, int(args.budget / per_round)))
    if per_round * repeats > args.max_group_seconds:
        repeats = max(1, int(args.max_group_seconds / per_round))
    timings = interleaved_timings(steps, repeats=repeats, warmup=0, device=device)
    for name in names:
        rows[name]["ms"] = timings[name].median_ms
        rows[name]["repeats"] = len(timings[name].seconds)
        rows[name]["spread"] = timings[name].spread if len(timings[name].seconds) > 1 else 0.0
    del models, steps
    gc.collect()
    return rows


def table(rows):
    lines = [
        "| model | image | DiT tokens | params | linear GFLOP | attention GFLOP | median s/step | repeats (spread) | peak activations | weights |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['resolution']}² | {r['tokens']:,} | {r['params'] / 1e9:.3f}B | {r['flops'].linear / 1e9:,.0f} | "
            f"{r['flops'].attention / 1e9:,.0f} | {r['ms'] / 1e3:,.2f} | {r['repeats']} ({r['spread']:.0%}) | "
            f"{fmt_bytes(r['peak_act'])} | {fmt_bytes(r['weights'])} |"
        )
    return "\n".join(lines)


DEFAULT_MODELS = ["PocketDiT tiny", "PocketDiT small", "PocketDiT small, dense", "PocketDiT full",
                  "PixArt-Sigma 0.6B", "SANA 0.6B", "SANA 1.6B"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--ablation-resolutions", type=int, nargs="*", default=[2048],
                    help="extra resolutions for PocketDiT small vs small-dense only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="fixed timed rounds (default: from --budget)")
    ap.add_argument("--min-repeats", type=int, default=3)
    ap.add_argument("--max-repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of timed rounds per group")
    ap.add_argument("--max-group-seconds", type=float, default=400.0, help="hard cap on one group's timed rounds")
    ap.add_argument("--big-resolution", type=int, default=1024, help="from this size on, run only --big-models ...")
    ap.add_argument("--big-models", nargs="+", default=None, help="... (default: all --models)")
    ap.add_argument("--big-repeats", type=int, default=None, help="... with this many timed rounds")
    ap.add_argument("--interleave", nargs="*", default=["PixArt-Sigma 0.6B", "SANA 0.6B"],
                    help="models timed round-robin with PocketDiT small and small-dense")
    ap.add_argument("--section", default="denoiser")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    threads = setup_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    all_specs = specs()
    unknown = [m for m in args.models if m not in all_specs]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {list(all_specs)}")
    started, load_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load_average()
    pair = ["PocketDiT small", "PocketDiT small, dense"]
    results, sections = {}, []
    big = [m for m in (args.big_models or args.models) if m in args.models]
    plan = [(res, args.models if res < args.big_resolution else big) for res in args.resolutions]
    plan += [(res, pair) for res in args.ablation_resolutions if res not in args.resolutions]
    not_run = [f"{m} at {res}²" for res in args.resolutions if res >= args.big_resolution for m in args.models if m not in big]
    if 2048 not in args.ablation_resolutions:
        not_run.append("PocketDiT small vs small-dense at 2048² (in this run; measured alone with --section denoiser-ablation-2048)")
    for res, names in plan:
        args.repeats_now = args.big_repeats if (res >= args.big_resolution and args.big_repeats) else args.repeats
        rows = []
        # small, its dense ablation and the --interleave peers are timed round-robin in one group (their
        # ratios are the targets, and the machine's load drifts); the rest one by one (memory)
        together = pair + [m for m in args.interleave if m not in pair]
        groups = [[n for n in names if n in together]] + [[n] for n in names if n not in together]
        for group in groups:
            if not group:
                continue
            t0 = time.time()
            got = measure_group(group, all_specs, res, args, args.device, dtype)
            for name in group:
                rows.append(got[name])
                results[(res, name)] = got[name]
            print(f"[{res}² {', '.join(group)}: {time.time() - t0:.0f} s]", flush=True)
        rows.sort(key=lambda r: names.index(r["name"]))
        text = f"#### {res}² images, batch 1\n\n{table(rows)}"
        print("\n" + text, flush=True)
        sections.append(text)

    # ASSA vs dense: measured against FLOP-bound speed-up
    ablation = ["| image | small s/step | small dense s/step | measured speed-up | FLOP-bound speed-up | measured / bound (target >= 0.9) |",
                "|---:|---:|---:|---:|---:|---:|"]
    for res in sorted({r for r, _ in results}):
        a, d = results.get((res, pair[0])), results.get((res, pair[1]))
        if a and d:
            measured = d["ms"] / a["ms"]
            bound = d["flops"].total / a["flops"].total
            ablation.append(f"| {res}² | {a['ms'] / 1e3:,.2f} | {d['ms'] / 1e3:,.2f} | {measured:.2f}x | {bound:.2f}x | "
                            f"{measured / bound:.2f} ({'met' if measured / bound >= 0.9 else 'NOT met'}) |")
    peers = []
    for res in args.resolutions:
        small = results.get((res, "PocketDiT small"))
        if not small:
            continue
        for peer in ("PixArt-Sigma 0.6B", "SANA 0.6B", "SANA 1.6B"):
            p = results.get((res, peer))
            if p:
                peers.append(f"- {res}²: PocketDiT small {small['ms'] / 1e3:,.2f} s vs {peer} {p['ms'] / 1e3:,.2f} s per step "
                             f"-> PocketDiT small is {p['ms'] / small['ms']:.2f}x {'faster' if p['ms'] > small['ms'] else 'as fast (slower)'}; "
                             f"FLOPs {small['flops'].total / 1e12:.2f} vs {p['flops'].total / 1e12:.2f} TFLOP, "
                             f"DiT tokens {small['tokens']:,} vs {p['tokens']:,}")
    round_robin = ["PocketDiT small", "small-dense"] + [m for m in args.interleave if m not in pair]
    header = [
        f"### Denoiser: one step, PocketDiT vs peers ({args.device}, {args.dtype})",
        "",
        machine_description(),
        f"- {versions('torch', 'diffusers')}; {threads} torch threads; {args.dtype}; batch 1; random weights",
        f"- text tokens: PocketDiT {POCKETDIT_TEXT_TOKENS} per encoder (2 encoders: 512-d and 2560-d), "
        f"PixArt-Sigma and SANA {PEER_TEXT_TOKENS}",
        f"- started {started}; load average at start {load_start}, at end {load_average()} (absolute times move "
        f"with the machine's load; {', '.join(round_robin[:-1])} and {round_robin[-1]} are timed round-robin in one group, so their ratios "
        "are comparable)",
        "- peak activations: bytes of tensors created during one step (weights excluded), tracked per op",
        f"- command: `{command_line()}`",
        f"- timed rounds: {args.repeats or f'{args.min_repeats}-{args.max_repeats} (budget {args.budget:.0f} s per group)'}"
        + (f"; {args.big_repeats} at {args.big_resolution}² and above" if args.big_repeats else "")
        + f"; a group stops after {args.max_group_seconds:.0f} s of timed rounds (the repeats column says how many ran)"
        + "; one untimed warm-up call per model first",
        *( [f"- not run (CPU time): {', '.join(not_run)}"] if not_run else [] ),
        "- configs: " + "; ".join(f"{s.name}: `{s.config}`" for s in all_specs.values() if s.name in args.models),
    ]
    markdown = "\n".join(header + ["", "#### PocketDiT small: ASSA vs dense attention", "", "\n".join(ablation), ""]
                         + (["#### Against peers", ""] + peers + [""] if peers else []) + ["\n\n".join(sections)])
    print("\n" + "\n".join(ablation) + "\n" + "\n".join(peers))
    if not args.no_write:
        write_section(args.section, markdown)
        print(f"wrote section {args.section!r} of BENCHMARKS.md")
    return results


if __name__ == "__main__":
    main()
