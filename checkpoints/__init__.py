"""Built-in models: small committed weights that install with the package (``pocketdit.checkpoints``).

Each subdirectory is a saved ``PocketDiTPipeline`` (model_index.json, fp16 or palettized safetensors, and for the
4-step models a ``lite/`` folder for the torch-free path, ``pocketdit.lite``) that
``pocketdit generate -m NAME`` and ``PocketDiTPipeline.from_pretrained(builtin_model_path(NAME))`` load. In a
source checkout this is the repository's top-level ``checkpoints/`` directory; setuptools maps it into the
package (pyproject.toml), so a wheel carries the same files.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_MODEL", "DEFAULT_WIDTH_MODELS", "builtin_models", "builtin_model_path", "default_width_models"]

# The model `pocketdit generate` uses without -m: the shapes base distilled to 4 steps and palettized to 4 bits
# (recipes/shapes_default.sh). `shapes-base` is the 28-step model it was distilled from.
DEFAULT_MODEL = "shapes-4step"
# The default's widths: each width is a model of its own (distilled separately), chosen by --model-width without -m.
DEFAULT_WIDTH_MODELS = {1.0: DEFAULT_MODEL, 0.5: "shapes-4step-0.5"}

_ROOT = Path(__file__).resolve().parent


def builtin_models() -> list[str]:
    """Names of the built-in models that are installed (directories with a model_index.json)."""
    return sorted(p.name for p in _ROOT.iterdir() if (p / "model_index.json").is_file())


def builtin_model_path(name: str = DEFAULT_MODEL) -> Path:
    """The directory of built-in model ``name``; a clear error when it is not installed."""
    path = _ROOT / name
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"built-in model {name!r} is not installed (have: {builtin_models() or 'none'}); pass -m with a pipeline, "
            "training run or checkpoint directory"
        )
    return path


def default_width_models() -> dict:
    """{width: directory} of the default model's widths that are installed, widest first."""
    return {w: _ROOT / name for w, name in sorted(DEFAULT_WIDTH_MODELS.items(), reverse=True)
            if (_ROOT / name / "model_index.json").is_file()}
