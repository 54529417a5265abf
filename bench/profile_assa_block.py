"""Where does one ASSA Down/Up block of PocketDiT `small` spend time that the dense block does not?

    python bench/profile_assa_block.py --side 128 --repeats 3            # 2048² (16384 tokens), time + profile
    python bench/profile_assa_block.py --side 64 --repeats 3             # 1024² (4096 tokens)
    python bench/profile_assa_block.py --side 128 --part attn --no-profile

Builds one `PocketDiTBlock` of the `small` preset (1024 wide, 16 heads x 64, 8 kv heads, FFN 4x, cross
attention to 77 + 77 + 1 text tokens of width 1344, 16 blocks, radius 1) once with ASSA and once with dense
attention (same weights where they share them), times their forward passes interleaved (no grad, like
bench/denoiser.py) and reports the measured ratio against the FLOP ratio (`pocketdit.profiling`, counted
on the meta device), with wall-clock and process CPU seconds per round (on a shared machine the CPU seconds
are the steadier of the two). `--part attn` times only the self-attention layer; `--mlp-ratio 3 --side 64`
is a Middle block. With profiling on, one extra
forward of each runs under torch.profiler and the top ops by self CPU time are printed with their shapes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, setup_threads  # noqa: E402

from pocketdit.attention import rope_2d  # noqa: E402
from pocketdit.model import PocketDiTBlock  # noqa: E402
from pocketdit.profiling import count_flops  # noqa: E402

SMALL = dict(dim=1024, num_heads=16, num_kv_heads=8, head_dim=64, mlp_ratio=4.0, cross_attention_dim=1344,
             num_blocks=16, block_radius=1)
TEXT_TOKENS = 77 + 77 + 1


def build(kind: str, device="cpu", seed=0, mlp_ratio=None):
    torch.manual_seed(seed)
    cfg = dict(SMALL, mlp_ratio=mlp_ratio or SMALL["mlp_ratio"])
    with torch.device(device):
        blk = PocketDiTBlock(attention_type=kind, **cfg).eval()
    if kind == "assa":  # a trained-looking gate (zero-init would make it constant; the cost is the same)
        with torch.no_grad():
            torch.nn.init.normal_(blk.attn.gate.weight, std=0.02)
    return blk


def inputs(side: int, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    n, d = side * side, SMALL["dim"]
    if device == "meta":
        rand = lambda *s: torch.empty(*s, device="meta")
    else:
        rand = lambda *s: torch.randn(*s, generator=g)
    x = rand(1, n, d)
    t_mod = rand(1, 6 * d) * (0.1 if device != "meta" else 1)
    context = rand(1, TEXT_TOKENS, SMALL["cross_attention_dim"])
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device)
    rope = rope_2d(side, side, SMALL["head_dim"], device=device)
    return x, t_mod, context, mask, rope, side, side


def call(blk, args, part: str):
    x, t_mod, context, mask, rope, h, w = args
    if part == "attn":
        return blk.attn(x, rope, h, w)
    return blk(*args)


def flops(kind: str, side: int, part: str, mlp_ratio=None):
    blk = build(kind, device="meta", mlp_ratio=mlp_ratio)
    args = inputs(side, device="meta")
    return count_flops(call, blk, args, part)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=128, help="token grid side (128 = 2048² image, 64 = 1024²)")
    p.add_argument("--part", choices=("block", "attn"), default="block")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--mlp-ratio", type=float, default=None, help="FFN ratio (small: 4 in Down/Up, 3 in Middle)")
    p.add_argument("--backend", default="auto", help="ASSA backend (attention.backends)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--rows", type=int, default=14, help="profile rows per model")
    a = p.parse_args(argv)
    setup_threads(a.threads)

    fl = {k: flops(k, a.side, a.part, a.mlp_ratio) for k in ("assa", "dense")}
    bound = fl["dense"].total / fl["assa"].total
    print(f"{a.side}x{a.side} = {a.side ** 2} tokens, part={a.part}, threads={torch.get_num_threads()}, "
          f"load {load_average()}")
    for k, f in fl.items():
        print(f"  FLOPs {k:5s}: linear {f.linear / 1e9:7.1f} G  attention {f.attention / 1e9:7.1f} G  "
              f"total {f.total / 1e9:7.1f} G")
    print(f"  FLOP bound dense/assa: {bound:.3f}x")

    blocks = {k: build(k, mlp_ratio=a.mlp_ratio) for k in ("assa", "dense")}
    blocks["assa"].attn.backend = a.backend
    args = inputs(a.side)
    times = {k: [] for k in blocks}
    cpu = {k: [] for k in blocks}  # process CPU time (all threads): less swayed by co-tenants than wall time
    with torch.no_grad():
        for k, blk in blocks.items():  # warm-up
            call(blk, args, a.part)
        for _ in range(a.repeats):
            for k, blk in blocks.items():
                t0, c0 = time.perf_counter(), time.process_time()
                call(blk, args, a.part)
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"  {k:5s}: median {med[k]:.3f} s  rounds {' '.join(f'{s:.3f}' for s in v)}  "
              f"(CPU s: {' '.join(f'{s:.2f}' for s in cpu[k])})")
    ratio = med["dense"] / med["assa"]
    print(f"  measured dense/assa: {ratio:.3f}x = {ratio / bound:.3f} of the FLOP bound "
          f"(load after: {load_average()})")
    for k, f in fl.items():
        print(f"  {k:5s}: {f.total / med[k] / 1e9:.1f} GFLOP/s overall")

    if a.no_profile:
        return
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for k, blk in blocks.items():
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                call(blk, args, a.part)
            print(f"\n=== {k}: top ops by self CPU time (one forward) ===")
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=40,
                max_shapes_column_width=90))


if __name__ == "__main__":
    main()
