"""PocketDiT: small, fast text-to-image diffusion transformers for phones.

Top-level names are imported lazily, so `import pocketdit` (and `pocketdit --help`) does not load torch or
diffusers until a model is actually used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "PocketDiT": "pocketdit.model",
    "PocketDiTOutput": "pocketdit.model",
    "InvalidResolutionError": "pocketdit.model",
    "PRESETS": "pocketdit.model",
    "PocketDiTPipeline": "pocketdit.pipeline",
    "TextConditioner": "pocketdit.text",
    "build_text_conditioner": "pocketdit.text",
    "load_autoencoder": "pocketdit.autoencoder",
    "TinyAutoencoder": "pocketdit.autoencoder",
    "train_autoencoder": "pocketdit.train_ae",
    "build_dataset": "pocketdit.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pocketdit' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
