"""Benchmark ASSA (each backend), its two branches and dense SDPA; writes BENCHMARKS.md section "attention".

    python bench/attention.py                      # CPU fp32, the full grid, writes BENCHMARKS.md
    python bench/attention.py --tokens 4096 --batch 1 --no-write
    python bench/attention.py --device cuda --dtype bf16 --section attention-gpu

Shapes are one Down/Up attention layer of PocketDiT `small`: 16 query heads x 64, 8 key/value heads
(grouped-query), the token grid square (1024 = 32x32, 4096 = 64x64, 16384 = 128x128), 16 blocks, radius 1.
Inputs are the projected q/k/v; ASSA includes the KV compression (2x2 depthwise conv) and the gate mix.

Score FLOPs count the two attention matmuls (QK^T and PV) over the keys each query may see: dense N,
global N/4, local (2r+1)*N/blocks. Forward+backward counts 3x the forward (2 matmuls forward, 4 backward;
FlashAttention's recomputation of QK^T is not counted). "Bound" is dense FLOPs / method FLOPs: the speed-up
if time followed FLOPs; "of bound" is measured speed-up / bound.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    fmt_bytes,
    fmt_ms,
    interleaved_timings,
    load_average,
    parse_dtype,
    peak_memory_bytes,
    setup_threads,
    versions,
)
from report import command_line, machine_description, write_section  # noqa: E402

from pocketdit.attention import KVCompression  # noqa: E402
from pocketdit.attention import backends  # noqa: E402
from pocketdit.attention.backends import adaptive_sparse_attention, blockwise_neighborhood_attention  # noqa: E402


def score_flops(batch, heads, queries, keys_per_query, head_dim):
    return 4 * batch * heads * queries * keys_per_query * head_dim


class Problem:
    def __init__(self, batch, tokens, heads, kv_heads, head_dim, blocks, radius, device, dtype, grad):
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"--tokens must be square numbers (a square token grid), got {tokens}")
        self.side, self.tokens, self.batch = side, tokens, batch
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.blocks, self.radius = blocks, radius
        g = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)

        self.q = rand(batch, heads, tokens, head_dim)
        self.k = rand(batch, kv_heads, tokens, head_dim)
        self.v = rand(batch, kv_heads, tokens, head_dim)
        self.gate = torch.rand(batch, heads, tokens, 1, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
        self.compress_k = KVCompression(kv_heads * head_dim).to(device=device, dtype=dtype)
        self.compress_v = KVCompression(kv_heads * head_dim).to(device=device, dtype=dtype)
        self.grad = grad
        self.inputs = [self.q, self.k, self.v, self.gate]

    # --- the methods, each returning the (B, H, N, D) output --------------------------------------
    def dense(self):
        return F.scaled_dot_product_attention(self.q, self.k, self.v, enable_gqa=self.kv_heads != self.heads)

    def compressed(self):
        return self.compress_k(self.k, self.side, self.side), self.compress_v(self.v, self.side, self.side)

    def assa(self, backend):
        kc, vc = self.compressed()
        return adaptive_sparse_attention(self.q, self.k, self.v, kc, vc, self.gate, self.blocks, self.radius, backend)

    def global_only(self):
        kc, vc = self.compressed()
        return F.scaled_dot_product_attention(self.q, kc, vc, enable_gqa=self.kv_heads != self.heads)

    def local_only(self, backend):
        return blockwise_neighborhood_attention(self.q, self.k, self.v, self.blocks, self.radius, backend)

    def keys_per_query(self, method):
        n = self.tokens
        local = (2 * self.radius + 1) * n // self.blocks
        return {"dense": n, "global": n // 4, "local": local, "assa": n // 4 + local, "natten": local}[method]


def natten_runner(p: Problem):
    """NATTEN 2D neighbourhood attention with a window holding as many keys as our local branch.

    Returns (callable, description) or (None, reason).
    """
    try:
        import natten
    except ImportError:
        return None, "NATTEN not installed"
    if p.grad:
        return None, "forward only"
    rows = min(p.side, max(1, p.keys_per_query("local") // p.side))  # (2r+1) blocks of full rows
    kernel = (rows, p.side)
    # NATTEN is heads-last: (B, X, Y, heads, D)
    # kv heads repeated explicitly: NATTEN's uncompiled Flex path fails on grouped-query inputs here
    rep = lambda t: t.detach().repeat_interleave(p.heads // p.kv_heads, dim=1)
    to_grid = lambda t: t.transpose(1, 2).reshape(p.batch, p.side, p.side, p.heads, p.head_dim).contiguous()
    q, k, v = to_grid(p.q.detach()), to_grid(rep(p.k)), to_grid(rep(p.v))

    def run():
        return natten.na2d(q, k, v, kernel_size=kernel)

    backend = "libnatten (fused)" if natten.HAS_LIBNATTEN else "flex-fna, uncompiled (NATTEN allows compiled Flex only on CUDA)"
    return run, f"NATTEN {natten.__version__} na2d kernel {kernel[0]}x{kernel[1]}, {backend}, kv heads repeated"


def run_config(p: Problem, mode: str, device, budget_s: float, include_reference: bool, include_natten: bool,
               min_repeats: int = 3):
    grad = mode == "fwd+bwd"
    fwd_backends = ["strided"]
    if torch.device(device).type == "cuda" and backends.flex_available():
        fwd_backends.append("flex")
    methods = {"dense": ("dense", p.dense)}
    for be in fwd_backends:
        methods[f"ASSA [{be}]"] = ("assa", lambda be=be: p.assa(be))
    if include_reference:
        methods["ASSA [reference]"] = ("assa", lambda: p.assa("reference"))
    methods["global only"] = ("global", p.global_only)
    methods["local only [strided]"] = ("local", lambda: p.local_only("strided"))
    if include_reference:
        methods["local only [reference]"] = ("local", lambda: p.local_only("reference"))
    notes = []
    if include_natten and not grad:
        natten_fn, desc = natten_runner(p)
        if natten_fn is not None:
            try:
                with torch.no_grad():
                    natten_fn()
                methods["NATTEN na2d (peer)"] = ("natten", natten_fn)
                notes.append(desc)
            except Exception as err:  # report, do not abort the bench
                notes.append(f"{desc}: failed at {p.tokens} tokens ({type(err).__name__}: {str(err).splitlines()[0][:120]})")

    def step(fn):
        if not grad:
            with torch.no_grad():
                return fn()
        for t in p.inputs:
            t.grad = None
        out = fn()
        out.backward(torch.ones_like(out))
        return out

    calls = {name: (lambda fn=fn: step(fn)) for name, (_, fn) in methods.items()}
    timings = interleaved_timings(calls, device=device, budget_s=budget_s, min_repeats=min_repeats)
    dense_ms = timings["dense"].median_ms
    dense_flops = score_flops(p.batch, p.heads, p.tokens, p.keys_per_query("dense"), p.head_dim)
    factor = 3 if grad else 1
    rows = []
    for name, (kind, _) in methods.items():
        t = timings[name]
        flops = score_flops(p.batch, p.heads, p.tokens, p.keys_per_query(kind), p.head_dim) * factor
        bound = dense_flops * factor / flops
        speedup = dense_ms / t.median_ms
        mem = peak_memory_bytes(calls[name], device)
        rows.append(
            dict(name=name, ms=t.median_ms, repeats=len(t.seconds), spread=t.spread, flops=flops,
                 gflops=flops / (t.median_ms * 1e-3) / 1e9, speedup=speedup, bound=bound, of_bound=speedup / bound, mem=mem)
        )
    return rows, notes


def table(rows):
    lines = [
        "| method | median ms | repeats (spread) | score GFLOP | GFLOP/s | speed-up vs dense | FLOP bound | of bound | peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {fmt_ms(r['ms'])} | {r['repeats']} ({r['spread']:.0%}) | {r['flops'] / 1e9:,.1f} | "
            f"{r['gflops']:,.1f} | {r['speedup']:.2f}x | {r['bound']:.2f}x | {r['of_bound']:.0%} | {fmt_bytes(r['mem'])} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--radius", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--budget", type=float, default=40.0, help="seconds of timed rounds per configuration (3-7 rounds)")
    ap.add_argument("--max-work", type=float, default=4096 * 4096 * 4 * 3,
                    help="skip configurations whose batch*tokens^2*(3 if fwd+bwd) exceeds this (CPU time guard)")
    ap.add_argument("--no-reference", action="store_true", help="leave out the reference backend")
    ap.add_argument("--reference-max-tokens", type=int, default=4096, help="reference backend only up to this size, batch 1")
    ap.add_argument("--min-repeats", type=int, default=3)
    ap.add_argument("--no-natten", action="store_true")
    ap.add_argument("--natten-max-tokens", type=int, default=1024, help="uncompiled NATTEN on CPU is slow")
    ap.add_argument("--section", default="attention")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    threads = setup_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    load_start = load_average()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts, skipped, peer_notes = [], [], set()
    summary = {}
    for tokens in args.tokens:
        for batch in args.batch:
            for mode in args.modes:
                work = batch * tokens * tokens * (3 if mode == "fwd+bwd" else 1)
                if torch.device(args.device).type == "cpu" and work > args.max_work:
                    skipped.append(f"{tokens} tokens, batch {batch}, {mode}")
                    continue
                p = Problem(batch, tokens, args.heads, args.kv_heads, args.head_dim, args.blocks, args.radius,
                            args.device, dtype, grad=mode == "fwd+bwd")
                use_natten = not args.no_natten and tokens <= args.natten_max_tokens and batch == 1
                t0 = time.time()
                use_ref = not args.no_reference and tokens <= args.reference_max_tokens and batch == 1
                rows, notes = run_config(p, mode, args.device, args.budget, use_ref, use_natten, args.min_repeats)
                peer_notes.update(notes)
                title = f"#### {tokens} tokens ({p.side}x{p.side}), batch {batch}, {mode}"
                parts.append(f"{title}\n\n{table(rows)}")
                print(f"\n{title}  [{time.time() - t0:.0f} s]\n{table(rows)}", flush=True)
                for r in rows:
                    summary[(tokens, batch, mode, r["name"])] = r
                del p

    fast = "flex" if torch.device(args.device).type == "cuda" else "strided"
    header = [
        f"### Attention: ASSA vs dense SDPA ({args.device}, {args.dtype})",
        "",
        machine_description(),
        f"- {versions('torch', 'natten')}; {threads} torch threads; {args.dtype}",
        f"- shapes: {args.heads} query heads x {args.head_dim}, {args.kv_heads} kv heads (GQA), {args.blocks} blocks, "
        f"radius {args.radius}; ASSA includes KV compression and the gate mix",
        f"- started {started}; load average at start {load_start}, at end {load_average()} "
        "(the machine was shared with other jobs; methods are timed interleaved, so ratios within a table "
        "are comparable, absolute times less so)",
        f"- command: `{command_line()}`",
    ]
    for note in sorted(peer_notes):
        header.append(f"- peer: {note}; its window has as many keys per query as our local branch (batch 1, "
                      f"forward, up to {args.natten_max_tokens} tokens)")
    if skipped:
        header.append(f"- not run (CPU time guard `--max-work`): {'; '.join(skipped)}")
    key = (4096, 1)
    targets = []
    for mode, goal in (("fwd", 2.0), ("fwd+bwd", 1.6)):
        r = summary.get(key + (mode, f"ASSA [{fast}]"))
        if r:
            targets.append(
                f"- **4096 tokens, batch 1, {mode}: ASSA [{fast}] {r['speedup']:.2f}x faster than dense "
                f"(target >= {goal}x: {'met' if r['speedup'] >= goal else 'NOT met'}); "
                f"{r['of_bound']:.0%} of the {r['bound']:.2f}x FLOP bound"
                + (f" (target: within 1.25x of the bound, i.e. >= 80%: {'met' if r['of_bound'] >= 0.8 else 'NOT met'})" if mode == "fwd" else "")
                + "**"
            )
    markdown = "\n".join(header + [""] + targets + [""] + ["\n\n".join(parts)])
    if not args.no_write:
        write_section(args.section, markdown)
        print(f"\nwrote section {args.section!r} of BENCHMARKS.md")
    return summary


if __name__ == "__main__":
    main()
