"""The package lists every module directory, and the built-in models install with it."""

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_under_src_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT / "src").parts) for p in (ROOT / "src" / "pocketdit").rglob("__init__.py")
    }
    assert found <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"



def test_builtin_models_resolve_or_fail_clearly():
    from pocketdit.checkpoints import DEFAULT_MODEL, builtin_model_path, builtin_models

    assert DEFAULT_MODEL in builtin_models()
    assert (builtin_model_path() / "model_index.json").is_file()
    with pytest.raises(FileNotFoundError, match="not installed"):
        builtin_model_path("no-such-model")


def test_the_shipped_default_loads_in_diffusers_and_fits_the_size_budget():
    """The default and its widths: diffusers' own loader reads them, each ships its torch-free graphs, and all
    installed weights stay within 30 MB (issue 19)."""
    from diffusers import DiffusionPipeline

    from pocketdit import PocketDiTPipeline  # noqa: F401  (registers the pipeline class with diffusers)
    from pocketdit.checkpoints import _ROOT, default_width_models

    models = default_width_models()
    assert set(models) == {1.0, 0.5}
    for path in models.values():
        assert (path / "lite" / "lite.json").is_file() and (path / "README.md").is_file()
    pipe = DiffusionPipeline.from_pretrained(str(models[1.0]))
    assert (pipe.default_steps, pipe.default_guidance) == (4, 1.0)
    shipped = sum(p.stat().st_size for p in _ROOT.rglob("*") if p.is_file() and "-resume" not in str(p)
                  and p.suffix in (".safetensors", ".onnx"))
    assert shipped <= 30 * 2**20, f"{shipped / 2**20:.1f} MiB of shipped weights"
