"""The recipes in recipes/ run for hours: catch a syntax error or a missing config before a user starts one."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.sh"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_parses(recipe):
    result = subprocess.run(["bash", "-n", str(recipe)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_files_exist(recipe):
    # Configs, bench scripts and committed checkpoints a recipe names must be in the repository.
    text = recipe.read_text()
    named = set(re.findall(r"\b((?:configs|bench|scripts)/[\w./-]+\.(?:yaml|py))", text))
    named |= set(re.findall(r"\b(checkpoints/[\w.-]+)", text))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"{recipe.name} names files that are not in the repository: {missing}"
