"""PocketDiT: small, fast text-to-image diffusion transformers for phones."""

__version__ = "0.1.0"

from .model import PRESETS, InvalidResolutionError, PocketDiT, PocketDiTOutput  # noqa: E402

__all__ = ["PRESETS", "InvalidResolutionError", "PocketDiT", "PocketDiTOutput", "__version__"]
