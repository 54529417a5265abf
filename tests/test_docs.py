"""Documentation that is generated from the code stays in step with it."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_architecture_preset_table_is_current():
    spec = importlib.util.spec_from_file_location("architecture_table", ROOT / "scripts" / "architecture_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--check"]) == 0, "run: python scripts/architecture_table.py"
