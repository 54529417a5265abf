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
