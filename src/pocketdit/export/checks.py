"""What `pocketdit export` and `pocketdit bench runtime` (and `quantize`'s loading) check before they start
work: the component options, the input checkpoint, the optional packages of a format; and loading the input
so that a checkpoint that is not one (or is damaged) is one `CLIError` line, not a traceback."""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path
from typing import Optional

from ..argtypes import CLIError, require_modules

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


@contextlib.contextmanager
def quiet_loading():
    """No 'Loading weights' / 'Loading pipeline components' bars from transformers and diffusers while a
    command loads its model: they say nothing here, and an error after them should stay one line."""
    toggles = []
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if module.is_progress_bar_enabled():
            module.disable_progress_bar()
            toggles.append(module)
    try:
        yield
    finally:
        for module in toggles:
            module.enable_progress_bar()


def load_input(path: str, text_encoder: Optional[str], autoencoder: Optional[str]):
    """load_parts, with a checkpoint that is not one (or is damaged) as one CLIError line instead of a traceback."""
    from ..checkpoint import CheckpointError
    from . import load_parts

    try:
        with quiet_loading():
            return load_parts(path, text_encoder, autoencoder)
    except (CheckpointError, OSError, ValueError, KeyError, TypeError, ImportError) as e:
        message = str(e) if not isinstance(e, KeyError) else f"missing entry {e}"
        if isinstance(e, json.JSONDecodeError):  # raised by a loader that does not say which file
            message = f"a JSON file in it is not valid JSON ({e})"
        raise CLIError(f"cannot load {path}: {message}") from None
    except RuntimeError as e:  # torch: weights that do not fit the config
        raise CLIError(f"cannot load {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def require_export_modules(fmt: Optional[str], scheme: Optional[str], feature: str) -> None:
    from . import required_modules

    require_modules(required_modules(fmt, scheme), feature, extra="export")
