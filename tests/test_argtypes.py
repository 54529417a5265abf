"""The shared argument checks: each kind of bad value is a clear error, each good one passes through."""

import argparse

import pytest

from pocketdit import argtypes as A


@pytest.mark.parametrize("parse, text, value", [
    (A.positive_int, "3", 3), (A.positive_int, "1e3", 1000), (A.non_negative_int, "0", 0),
    (A.seed, "0", 0), (A.seed, str(2**63 - 1), 2**63 - 1), (A.threads, "0", 0),
    (A.finite_float(0.0, 10.0), "2.5", 2.5), (A.positive_float, "1e-9", 1e-9),
])
def test_good_values(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize("parse, text, match", [
    (A.positive_int, "0", "positive"), (A.positive_int, "2.5", "integer"), (A.positive_int, "x", "integer"),
    (A.positive_int, "inf", "integer"), (A.non_negative_int, "-1", ">= 0"), (A.seed, "-1", "seed"),
    (A.seed, "1e23", "seed"), (A.threads, "-1", "threads"), (A.finite_float(), "nan", "finite"),
    (A.finite_float(0.0, 10.0), "11", "<= 10"), (A.positive_float, "0", "> 0"), (A.finite_float(), "1e400", "finite"),
])
def test_bad_values(parse, text, match):
    with pytest.raises(argparse.ArgumentTypeError, match=match):
        parse(text)


def test_parser_errors_are_one_line_cli_errors():
    p = A.ArgumentParser(prog="pocketdit thing")
    p.add_argument("--n", type=A.positive_int)
    with pytest.raises(A.CLIError, match=r"^thing: argument --n: expected a positive integer, got 0 \(see"):
        p.parse_args(["--n", "0"])


def test_output_file_checks(tmp_path):
    assert A.check_output_file(tmp_path / "new" / "deeper" / "a.png", "-o", A.IMAGE_EXTENSIONS)
    with pytest.raises(A.CLIError, match="is a directory"):
        A.check_output_file(tmp_path, "-o")
    with pytest.raises(A.CLIError, match="unknown extension '.xyz'"):
        A.check_output_file(tmp_path / "a.xyz", "-o", A.IMAGE_EXTENSIONS)
    (tmp_path / "f").write_text("x")
    with pytest.raises(A.CLIError, match="is not a directory"):
        A.check_output_file(tmp_path / "f" / "a.png", "-o")
    with pytest.raises(A.CLIError, match="cannot write in /proc"):
        A.check_output_file("/proc/a.png", "-o")


def test_output_dir_checks(tmp_path):
    A.check_output_dir(tmp_path / "new", "-o")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(A.CLIError, match=r"not empty \(x\).*--overwrite"):
        A.check_output_dir(tmp_path / "full", "-o")
    A.check_output_dir(tmp_path / "full", "-o", overwrite=True)
    A.check_output_dir(tmp_path / "full", "-o", allowed=["x"])
    with pytest.raises(A.CLIError, match="is a file"):
        A.check_output_dir(tmp_path / "full" / "x", "-o")


def test_device_and_modules():
    assert A.check_device("cpu") == "cpu" and A.check_device("auto") == "auto"
    with pytest.raises(A.CLIError, match="not a device"):
        A.check_device("tpu")
    A.require_modules(["json"], "a feature")
    with pytest.raises(A.CLIError, match=r"needs no_such_module_x, which is not installed \(pip install 'pocketdit\[e\]'\)"):
        A.require_modules(["json", "no_such_module_x"], "a feature", extra="e")
