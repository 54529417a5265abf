"""Fast implementations of blockwise neighbourhood attention, selected by `bna_dispatch`.

Each backend must agree with `functional.bna_reference` (tests prove it). Only the reference exists so
far; faster paths are registered here.
"""

from __future__ import annotations

from .functional import bna_reference

_BACKENDS = {"reference": bna_reference}


def available_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def bna_dispatch(q, k, v, num_blocks: int, radius: int, backend: str = "auto"):
    if backend == "auto":
        backend = "reference"
    try:
        fn = _BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; choose from {('auto',) + available_backends()}") from None
    return fn(q, k, v, num_blocks, radius)
