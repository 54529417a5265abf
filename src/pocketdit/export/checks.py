"""What `pocketdit export` and `pocketdit bench runtime` (and `quantize`'s loading) check before they start
work: the component options, the input checkpoint, the optional packages of a format; and loading the input
so that a checkpoint that is not one (or is damaged) is one `CLIError` line, not a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..argtypes import CLIError, loading_input, require_modules

MINILM_NAMES = ("minilm", "minilm-l6-v2", "all-minilm-l6-v2")


def check_component_options(text_encoder: Optional[str], autoencoder: Optional[str]) -> None:
    """--text-encoder / --autoencoder: a known name, 'none' or a local directory that exists (before loading)."""
    if text_encoder is not None:
        specs = [s.strip() for s in text_encoder.split(",")]
        if any(not s for s in specs):
            raise CLIError(f"--text-encoder {text_encoder!r}: empty entry; pass 'minilm', local encoder directories "
                           "(comma-separated) or 'none'")
        if "none" in specs and len(specs) > 1:
            raise CLIError(f"--text-encoder {text_encoder!r}: 'none' cannot be combined with other encoders")
        for s in specs:
            if s != "none" and s.lower() not in MINILM_NAMES and not Path(s).expanduser().is_dir():
                what = "is a file, not a directory" if Path(s).expanduser().exists() else "no such directory"
                raise CLIError(f"--text-encoder {s}: {what} (pass 'minilm', a local encoder directory or 'none')")
    if autoencoder is not None:
        a = autoencoder.strip()
        if not a:
            raise CLIError("--autoencoder '': pass 'pixel', a local autoencoder directory or 'none'")
        if a not in ("none",) and a.lower() != "pixel" and not Path(a).expanduser().is_dir():
            what = "is a file, not a directory" if Path(a).expanduser().exists() else "no such directory"
            raise CLIError(f"--autoencoder {a}: {what} (pass 'pixel', a local autoencoder directory or 'none')")


def check_input_path(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"checkpoint {p} does not exist; pass a pipeline, training run or PocketDiT directory")
    if not p.is_dir():
        raise CLIError(f"checkpoint {p} is a file; pass a pipeline, training run or PocketDiT directory")
    return p


def load_input(path: str, text_encoder: Optional[str], autoencoder: Optional[str]):
    """load_parts, with a checkpoint that is not one (or is damaged) as one CLIError line instead of a traceback."""
    from . import load_parts

    with loading_input(path):
        return load_parts(path, text_encoder, autoencoder)


def require_export_modules(fmt: Optional[str], scheme: Optional[str], feature: str) -> None:
    from . import required_modules

    require_modules(required_modules(fmt, scheme), feature, extra="export")
