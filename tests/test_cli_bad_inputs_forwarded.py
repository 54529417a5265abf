"""Bad input to the forwarded commands (`pocketdit quantize`, `export`, `bench runtime`): one
`pocketdit: error: ...` line on stderr, exit code 2, no traceback, nothing done (issue 15).

The table below is the list docs/reliability.md draws on: every case runs in-process through
`pocketdit.cli.main` and fails before any model work (most before a model is even loaded). Paths in the
argv templates: {tmp} (a fresh folder), {base} (the built-in shapes-base pipeline, read only), {resume}
(the built-in training run, read only) and the fake inputs/outputs that `fakes` builds in {tmp}.
"""

import json
import sys
from pathlib import Path

import pytest

import pocketdit.export.cli  # noqa: F401  (import noise of third-party packages happens here, not in a case)
import pocketdit.export.runtime_bench  # noqa: F401
import pocketdit.quantize.cli  # noqa: F401
from pocketdit.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "checkpoints" / "shapes-base"
RESUME = ROOT / "checkpoints" / "shapes-base-resume"

POCKETDIT = json.dumps({"_class_name": "PocketDiT"})
FAKES = {
    # name: {relative file: text}; "" names a folder
    "empty": {},
    "badjson": {"config.json": "{not json"},
    "noweights": {"config.json": POCKETDIT},  # also: a bare transformer directory (no pipeline)
    "badweights": {"config.json": POCKETDIT, "diffusion_pytorch_model.safetensors": "garbage"},
    "badlatest": {"latest": "checkpoint-0000009"},
    "badstate": {"trainer_state.json": "{", "transformer/config.json": "{}"},
    "badindex": {"model_index.json": "{"},
    "badquant": {"config.json": POCKETDIT, "quantization_config.json": "{"},
    "otherclass": {"config.json": json.dumps({"_class_name": "UNet2DModel"})},
    "run": {"config.json": "{}", "checkpoint-0000001/trainer_state.json": "{}"},  # an existing training run
    "other": {"notes.txt": "keep me"},
    "prevquant": {"config.json": POCKETDIT, "quantization_config.json": "{}", "torchao.safetensors": "",
                  "quantize_report.json": "{}"},
    "prevexport": {"export.json": "{}", "denoiser.onnx": "", "text_encoder.onnx": ""},
    "benchdir/onnx-fp32": {"config.json": "{}", "checkpoint-0000001/trainer_state.json": "{}"},
    "cwd/exports/onnx": {"export.json": "{}", "denoiser.onnx": ""},
}


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    for name, files in FAKES.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for rel, text in files.items():
            (root / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / name / rel).write_text(text)
    (root / "afile.txt").write_text("not a model")
    return root


Q = ["quantize", "{base}", "--scheme"]
E = ["export", "{base}", "--format", "onnx", "--resolution", "32"]
B = ["bench", "runtime", "{base}", "--configs", "eager-fp32", "--export-dir", "{tmp}/bench"]

# (id, argv, expected text in the error line, modules made to look uninstalled)
CASES = [
    # ---- quantize: the input
    ("quantize missing input", ["quantize", "{tmp}/nope", "--scheme", "int8", "-o", "{tmp}/q"], "does not exist", ()),
    ("quantize input is a file", ["quantize", "{tmp}/afile.txt", "--scheme", "int8", "-o", "{tmp}/q"], "is a file", ()),
    ("quantize empty directory", ["quantize", "{tmp}/empty", "--scheme", "int8", "-o", "{tmp}/q"], "neither a checkpoint", ()),
    ("quantize config.json not JSON", ["quantize", "{tmp}/badjson", "--scheme", "int8", "-o", "{tmp}/q"], "cannot load", ()),
    ("quantize config without weights", ["quantize", "{tmp}/noweights", "--scheme", "int8", "-o", "{tmp}/q"],
     "no diffusion_pytorch_model.safetensors", ()),
    ("quantize corrupt weights", ["quantize", "{tmp}/badweights", "--scheme", "int8", "-o", "{tmp}/q"], "corrupt or truncated", ()),
    ("quantize run with dangling latest", ["quantize", "{tmp}/badlatest", "--scheme", "int8", "-o", "{tmp}/q"], "damaged", ()),
    ("quantize trainer_state.json not JSON", ["quantize", "{tmp}/badstate", "--scheme", "int8", "-o", "{tmp}/q"], "not valid JSON", ()),
    ("quantize model_index.json not JSON", ["quantize", "{tmp}/badindex", "--scheme", "int8", "-o", "{tmp}/q"], "not valid JSON", ()),
    ("quantize quantization_config.json not JSON", ["quantize", "{tmp}/badquant", "--scheme", "int8", "-o", "{tmp}/q"],
     "not valid JSON", ()),
    ("quantize another model class", ["quantize", "{tmp}/otherclass", "--scheme", "int8", "-o", "{tmp}/q"], "neither a checkpoint", ()),
    ("quantize already quantized", ["quantize", "{tmp}/quantized", "--scheme", "int8", "-o", "{tmp}/q"], "already quantized", ()),
    # ---- quantize: the output
    ("quantize -o existing run", Q + ["int8", "-o", "{tmp}/run"], "directory is not empty", ()),
    ("quantize -o non-empty directory", Q + ["int8", "-o", "{tmp}/other"], "directory is not empty", ()),
    ("quantize -o previous quantize output", Q + ["int8", "-o", "{tmp}/prevquant"], "pass --overwrite", ()),
    ("quantize -o is a file", Q + ["int8", "-o", "{tmp}/afile.txt"], "is a file", ()),
    ("quantize -o is the input", Q + ["int8", "-o", "{base}", "--overwrite"], "is the input checkpoint", ()),
    ("quantize -o unwritable", Q + ["int8", "-o", "/proc/pocketdit-q"], "cannot write", ()),
    # ---- quantize: numbers and combinations
    ("quantize --finetune-steps -5", Q + ["palettize4", "-o", "{tmp}/q", "--finetune-steps", "-5"], "integer >= 0", ()),
    ("quantize --nbits 5", Q + ["palettize4", "-o", "{tmp}/q", "--nbits", "5"], "one of 1, 2, 3, 4, 6, 8", ()),
    ("quantize --nbits 0", Q + ["palettize4", "-o", "{tmp}/q", "--nbits", "0"], "positive integer", ()),
    ("quantize --high-nbits below --nbits", Q + ["palettize4", "-o", "{tmp}/q", "--nbits", "8", "--high-nbits", "4"],
     "must be >= --nbits", ()),
    ("quantize --target-avg-bits nan", Q + ["palettize4", "-o", "{tmp}/q", "--target-avg-bits", "nan"], "finite", ()),
    ("quantize --target-avg-bits 9", Q + ["palettize4", "-o", "{tmp}/q", "--target-avg-bits", "9"], "<= 8", ()),
    ("quantize --target-avg-bits outside nbits..high", Q + ["palettize4", "-o", "{tmp}/q", "--nbits", "2", "--high-nbits", "4",
                                                           "--target-avg-bits", "5"], "must lie between", ()),
    ("quantize default target vs --nbits 6", Q + ["palettize4", "-o", "{tmp}/q", "--nbits", "6"], "(the default)", ()),
    ("quantize --group-size 3", Q + ["8da4w", "-o", "{tmp}/q", "--group-size", "3"], "power of two", ()),
    ("quantize --group-size 0", Q + ["8da4w", "-o", "{tmp}/q", "--group-size", "0"], "positive integer", ()),
    ("quantize --group-size with int8", Q + ["int8", "-o", "{tmp}/q", "--group-size", "32"], "8da4w only", ()),
    ("quantize --nbits with int8", Q + ["int8", "-o", "{tmp}/q", "--nbits", "4"], "palettize4 only", ()),
    ("quantize --finetune-steps with 8da4w", Q + ["8da4w", "-o", "{tmp}/q", "--finetune-steps", "5"], "palettize4 only", ()),
    ("quantize --lut-group-channels 0", Q + ["palettize4", "-o", "{tmp}/q", "--lut-group-channels", "0"], "positive integer", ()),
    ("quantize --calibration-prompts 0", Q + ["palettize4", "-o", "{tmp}/q", "--calibration-prompts", "0"], "positive integer", ()),
    ("quantize --calibration-prompts 500", Q + ["palettize4", "-o", "{tmp}/q", "--calibration-prompts", "500"], "at most", ()),
    ("quantize --calibration-prompts some", Q + ["palettize4", "-o", "{tmp}/q", "--calibration-prompts", "a red circle"],
     "expected an integer", ()),
    ("quantize --sensitivity-batches 0", Q + ["palettize4", "-o", "{tmp}/q", "--sensitivity-batches", "0"], "positive integer", ()),
    ("quantize --lr inf", Q + ["palettize4", "-o", "{tmp}/q", "--finetune-steps", "1", "--lr", "inf"], "finite", ()),
    ("quantize --lr -1", Q + ["palettize4", "-o", "{tmp}/q", "--finetune-steps", "1", "--lr", "-1"], "> 0", ()),
    ("quantize --lr without --finetune-steps", Q + ["palettize4", "-o", "{tmp}/q", "--lr", "1e-4"], "--finetune-steps", ()),
    ("quantize --eval of a bare transformer", ["quantize", "{tmp}/noweights", "--scheme", "int8", "-o", "{tmp}/q", "--eval"],
     "bare transformer", ()),
    ("quantize --shapes-eval without --eval", Q + ["int8", "-o", "{tmp}/q", "--shapes-eval"], "pass --eval", ()),
    ("quantize --eval-images without --eval", Q + ["int8", "-o", "{tmp}/q", "--eval-images", "4"], "with --eval only", ()),
    ("quantize --eval-images 0", Q + ["int8", "-o", "{tmp}/q", "--eval", "--eval-images", "0"], "positive integer", ()),
    ("quantize --eval-images 500", Q + ["int8", "-o", "{tmp}/q", "--eval", "--eval-images", "500"], "at most", ()),
    ("quantize --eval-steps 0", Q + ["int8", "-o", "{tmp}/q", "--eval-steps", "0"], "positive integer", ()),
    ("quantize --eval-steps 2.5", Q + ["int8", "-o", "{tmp}/q", "--eval-steps", "2.5"], "expected an integer", ()),
    ("quantize --seed -1", Q + ["int8", "-o", "{tmp}/q", "--seed", "-1"], "seed", ()),
    ("quantize --seed 1e30", Q + ["int8", "-o", "{tmp}/q", "--seed", "1e30"], "seed", ()),
    ("quantize unknown scheme", Q + ["int4", "-o", "{tmp}/q"], "invalid choice", ()),
    ("quantize without --scheme", ["quantize", "{base}", "-o", "{tmp}/q"], "required", ()),
    # ---- quantize: packages
    ("quantize palettize4 without coremltools", Q + ["palettize4", "-o", "{tmp}/q"], "pocketdit[export]", ("coremltools",)),
    ("quantize int8 without torchao", Q + ["int8", "-o", "{tmp}/q"], "needs torchao", ("torchao",)),
    ("quantize calibration without scipy", Q + ["palettize4", "-o", "{tmp}/q"], "pocketdit[eval]", ("scipy",)),
    # ---- export: the input and the components
    ("export missing input", ["export", "{tmp}/nope", "--format", "onnx", "--resolution", "32", "-o", "{tmp}/e"], "does not exist", ()),
    ("export input is a file", ["export", "{tmp}/afile.txt", "--format", "onnx", "--resolution", "32", "-o", "{tmp}/e"],
     "is a file", ()),
    ("export empty directory", ["export", "{tmp}/empty", "--format", "onnx", "--resolution", "32", "-o", "{tmp}/e"],
     "neither a checkpoint", ()),
    ("export corrupt weights", ["export", "{tmp}/badweights", "--format", "onnx", "--resolution", "32", "-o", "{tmp}/e"],
     "corrupt or truncated", ()),
    ("export trainer_state.json not JSON", ["export", "{tmp}/badstate", "--format", "onnx", "--resolution", "32", "-o", "{tmp}/e"],
     "not valid JSON", ()),
    ("export model_index.json not JSON", ["export", "{tmp}/badindex", "--format", "onnx", "--resolution", "32", "-o", "{tmp}/e"],
     "not valid JSON", ()),
    ("export run --text-encoder missing dir", ["export", "{resume}", "--format", "onnx", "--resolution", "32", "-o", "{tmp}/e",
                                               "--text-encoder", "{tmp}/nope"], "no such directory", ()),
    ("export run --autoencoder missing dir", ["export", "{resume}", "--format", "onnx", "--resolution", "32", "-o", "{tmp}/e",
                                              "--autoencoder", "{tmp}/nope"], "no such directory", ()),
    ("export --text-encoder is a file", E + ["-o", "{tmp}/e", "--text-encoder", "{tmp}/afile.txt"], "is a file", ()),
    ("export --text-encoder minilm,none", E + ["-o", "{tmp}/e", "--text-encoder", "minilm,none"], "cannot be combined", ()),
    ("export --autoencoder empty", E + ["-o", "{tmp}/e", "--autoencoder", ""], "--autoencoder", ()),
    # ---- export: the output
    ("export -o existing run", E + ["-o", "{tmp}/run"], "directory is not empty", ()),
    ("export -o previous export", E + ["-o", "{tmp}/prevexport"], "pass --overwrite", ()),
    ("export default exports/onnx not empty", ["export", "{base}", "--format", "onnx", "--resolution", "32"],
     "exports/onnx: directory is not empty", ()),
    ("export -o is a file", E + ["-o", "{tmp}/afile.txt"], "is a file", ()),
    ("export -o is the input", E + ["-o", "{base}", "--overwrite"], "is the input checkpoint", ()),
    # ---- export: numbers, formats, packages
    ("export --resolution 0", ["export", "{base}", "--format", "onnx", "--resolution", "0", "-o", "{tmp}/e"], "positive integer", ()),
    ("export --resolution 33", ["export", "{base}", "--format", "onnx", "--resolution", "33", "-o", "{tmp}/e"],
     "nearest valid image sizes", ()),
    ("export --width 0", E + ["-o", "{tmp}/e", "--width", "0"], "number > 0", ()),
    ("export --steps 0", E + ["-o", "{tmp}/e", "--steps", "0"], "positive integer", ()),
    ("export --batch-size -1", E + ["-o", "{tmp}/e", "--batch-size", "-1"], "positive integer", ()),
    ("export --min-psnr nan", E + ["-o", "{tmp}/e", "--min-psnr", "nan"], "finite", ()),
    ("export --shift 0", E + ["-o", "{tmp}/e", "--shift", "0"], "> 0", ()),
    ("export --shift inf", E + ["-o", "{tmp}/e", "--shift", "inf"], "finite", ()),
    ("export --seed -3", E + ["-o", "{tmp}/e", "--seed", "-3"], "seed", ()),
    ("export unknown --format", ["export", "{base}", "--format", "tflite", "--resolution", "32", "-o", "{tmp}/e"], "invalid choice", ()),
    ("export executorch --quantize int8", ["export", "{base}", "--format", "executorch", "--resolution", "32", "-o", "{tmp}/e",
                                           "--quantize", "int8"], "no executorch lowering", ()),
    ("export onnx without onnxruntime", E + ["-o", "{tmp}/e"], "needs onnxruntime", ("onnxruntime",)),
    ("export executorch without executorch", ["export", "{base}", "--format", "executorch", "--resolution", "32", "-o", "{tmp}/e"],
     "needs executorch", ("executorch",)),
    ("export coreml without coremltools", ["export", "{base}", "--format", "coreml", "--resolution", "32", "-o", "{tmp}/e"],
     "needs coremltools", ("coremltools",)),
    ("export --quantize 8da4w without torchao", ["export", "{base}", "--format", "executorch", "--resolution", "32", "-o", "{tmp}/e",
                                                 "--quantize", "8da4w"], "needs torchao", ("torchao",)),
    # ---- bench
    ("bench without a benchmark", ["bench"], "name the benchmark", ()),
    ("bench unknown benchmark", ["bench", "speed"], "unknown bench", ()),
    ("bench --runs 0", B + ["--runs", "0"], "positive integer", ()),
    ("bench --runs -2", B + ["--runs", "-2"], "positive integer", ()),
    ("bench --warmup -1", B + ["--warmup", "-1"], "integer >= 0", ()),
    ("bench --steps 0", B + ["--steps", "0"], "positive integer", ()),
    ("bench --threads -1", B + ["--threads", "-1"], "threads", ()),
    ("bench --threads 100000", B + ["--threads", "100000"], "threads", ()),
    ("bench --resolution 0", B + ["--resolution", "0"], "positive integer", ()),
    ("bench --resolution 33", B + ["--resolution", "33"], "nearest valid image sizes", ()),
    ("bench unknown --configs", B + ["--configs", "eager-fp64"], "unknown configuration", ()),
    ("bench empty --configs", B + ["--configs", ","], "no configuration", ()),
    ("bench --json is a directory", B + ["--json", "{tmp}"], "is a directory", ()),
    ("bench --json unwritable", B + ["--json", "/proc/pocketdit/bench.json"], "cannot write", ()),
    ("bench --export-dir is a file", B[:-1] + ["{tmp}/afile.txt", "--configs", "onnx-fp32"], "is a file", ()),
    ("bench --export-dir holding a run", B[:-1] + ["{tmp}/benchdir", "--configs", "onnx-fp32"], "not a onnx export", ()),
    ("bench missing input", ["bench", "runtime", "{tmp}/nope", "--configs", "eager-fp32"], "does not exist", ()),
    ("bench corrupt input", ["bench", "runtime", "{tmp}/badweights", "--configs", "eager-fp32", "--export-dir", "{tmp}/bench"],
     "corrupt or truncated", ()),
    ("bench --autoencoder missing dir", B + ["--autoencoder", "{tmp}/nope"], "no such directory", ()),
    ("bench executorch config without executorch", B[:-3] + ["executorch-fp32", "--export-dir", "{tmp}/bench"],
     "needs executorch", ("executorch",)),
    ("bench eager-int8 without torchao", B[:-3] + ["eager-int8", "--export-dir", "{tmp}/bench"], "needs torchao", ("torchao",)),
    ("bench onnx config without onnx", B[:-3] + ["onnx-int8", "--export-dir", "{tmp}/bench"], "needs onnx", ("onnx",)),
]


@pytest.fixture(scope="module")
def quantized(fakes):
    """A real int8 checkpoint (of a nano PocketDiT) for the "already quantized" case."""
    import torch

    from pocketdit import quantize as Q
    from pocketdit.model import PocketDiT

    torch.manual_seed(0)
    model = PocketDiT.from_preset("nano").eval()
    Q.quantize_(model, Q.Int8WeightOnly())
    Q.save_quantized(model, fakes / "quantized")
    return fakes / "quantized"


@pytest.mark.parametrize("argv, expected, missing", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line(argv, expected, missing, fakes, request, capsys, monkeypatch):
    if "{tmp}/quantized" in argv:
        request.getfixturevalue("quantized")
    paths = {"tmp": str(fakes), "base": str(BASE), "resume": str(RESUME)}
    argv = [a.format(**paths) for a in argv]
    if "export" == argv[0] and "-o" not in argv:  # the default output folder, relative to the working directory
        monkeypatch.chdir(fakes / "cwd")
    for module in missing:  # importlib.util.find_spec answers None for these
        monkeypatch.setitem(sys.modules, module, None)
    before = sorted(p.name for p in fakes.iterdir())
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("pocketdit: error: "), err
    assert "Traceback" not in err and expected in lines[0], err
    assert out == "", out  # nothing started
    assert sorted(p.name for p in fakes.iterdir()) == before  # nothing written (no q/, e/, bench/)


def test_table_is_long_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_bench_configs_need_only_their_own_packages(monkeypatch, tmp_path):
    """`bench runtime --configs eager-fp32` needs neither ExecuTorch nor onnxruntime."""
    from pocketdit.export import runtime_bench

    for module in ("executorch", "onnxruntime", "onnx", "torchao", "coremltools"):
        monkeypatch.setitem(sys.modules, module, None)
    args = runtime_bench.parser().parse_args([str(BASE), "--configs", "eager-fp32,eager-fp32", "--export-dir", str(tmp_path)])
    assert runtime_bench._check(args) == ["eager-fp32"]


def test_export_honours_component_options_for_a_training_run():
    """--text-encoder / --autoencoder apply to training runs and checkpoints too (they were ignored)."""
    from pocketdit.export import load_parts

    parts = load_parts(RESUME, "none", "pixel")
    assert parts.text_conditioner is None and getattr(parts.autoencoder, "name", "") == "pixel"
    assert parts.default_size == 32 and parts.shift > 0


def test_quantize_rewrites_its_previous_output_only_with_overwrite(tmp_path, capsys):
    import torch

    from pocketdit.model import PocketDiT

    torch.manual_seed(0)
    PocketDiT.from_preset("nano").save_pretrained(tmp_path / "nano")
    argv = ["quantize", str(tmp_path / "nano"), "--scheme", "int8", "-o", str(tmp_path / "q")]
    assert main(argv) == 0
    report = (tmp_path / "q" / "quantize_report.json").read_text()
    capsys.readouterr()
    assert main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "q" / "quantize_report.json").read_text() == report  # untouched
    assert main(argv + ["--overwrite"]) == 0
