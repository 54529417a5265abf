"""Shared timing and memory helpers for the scripts in bench/.

Timings on a shared machine are noisy, so the benches compare methods *interleaved* (round-robin in one
process: dense, ours, dense, ours, ...) and report medians; ratios between methods of one run are what the
targets are stated in.
"""

from __future__ import annotations

import os
import statistics
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "setup_threads",
    "synchronize",
    "interleaved_timings",
    "Timing",
    "peak_memory_bytes",
    "fmt_bytes",
    "fmt_ms",
    "load_average",
    "versions",
    "parse_dtype",
]


def setup_threads(threads: int | None) -> int:
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(table)}")
    return table[name]


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        return (max(self.seconds) - min(self.seconds)) / statistics.median(self.seconds)


def interleaved_timings(
    fns: dict[str, Callable[[], object]],
    repeats: int | None = None,
    warmup: int = 1,
    device="cpu",
    budget_s: float = 60.0,
    max_repeats: int = 7,
    min_repeats: int = 1,
) -> dict[str, Timing]:
    """Time every function round-robin; `repeats=None` picks as many rounds as fit `budget_s` (>= 1).

    The warm-up round (allocators, one-time kernel selection, compilation) is not recorded, but its
    duration sets the automatic repeat count.
    """
    warm_s = 0.0
    for _ in range(warmup):
        for fn in fns.values():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            warm_s += time.perf_counter() - start
    if repeats is None:
        per_round = warm_s / max(warmup, 1)
        repeats = max(min_repeats, min(max_repeats, int(budget_s / max(per_round, 1e-9))))
    out = {name: Timing() for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            out[name].seconds.append(time.perf_counter() - start)
    return out


class _LiveTensorBytes(TorchDispatchMode):
    """Counts bytes of tensor storages created by ops while active, freeing them when they die.

    Views and in-place results share an existing storage and are not counted again. Memory a kernel
    allocates internally (e.g. SDPA's per-thread scratch) is invisible here; that is small next to the
    tensors attention produces and saves for backward.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}  # storage pointer -> number of live tensors on it we counted

    def _release(self, ptr: int, nbytes: int) -> None:
        left = self._seen.get(ptr, 0) - 1
        if left <= 0:
            self._seen.pop(ptr, None)
            self.live -= nbytes
        else:
            self._seen[ptr] = left

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliasing = func._schema.is_mutable or any(r.alias_info is not None for r in func._schema.returns)
        if not aliasing:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    storage = t.untyped_storage()
                    ptr, nbytes = storage.data_ptr(), storage.nbytes()
                    if ptr in self._seen:
                        self._seen[ptr] += 1
                    else:
                        self._seen[ptr] = 1
                        self.live += nbytes
                        self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._release, ptr, nbytes)
        return out


def peak_memory_bytes(fn: Callable[[], object], device="cpu") -> int | None:
    """Peak bytes allocated by one call of `fn` above what was allocated before it.

    CUDA: the caching allocator's peak statistic. CPU: tensors created by ops during the call (see
    `_LiveTensorBytes`), which includes activations saved for backward.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    mode = _LiveTensorBytes()
    try:
        with mode:
            result = fn()
    except NotImplementedError:  # higher-order ops (FlexAttention) do not pass through dispatch modes
        return None
    del result
    return mode.peak


def fmt_ms(ms: float) -> str:
    return f"{ms:,.1f}" if ms < 1e4 else f"{ms:,.0f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min)"


def versions(*packages: str) -> str:
    import importlib.metadata as md

    parts = []
    for name in packages:
        try:
            parts.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)
