"""Bad input to every `pocketdit` command is one `pocketdit: error:` line on stderr, exit 2, no traceback,
and no work done first. The table is the sweep of docs/reliability.md (the forwarded commands quantize,
export and bench have theirs in test_cli_bad_inputs_forwarded.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pocketdit.cli import main

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "checkpoints" / "shapes-base")  # the built-in model: read, never written


def _fake_run(root: Path) -> Path:
    """A directory that looks like a training run (config + checkpoint), for commands that must not clobber it."""
    run = root / "run"
    (run / "checkpoint-0000001").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "latest").write_text("checkpoint-0000001")
    return run


def _files(root: Path) -> dict[str, str]:
    (root / "a_file").write_text("x")
    (root / "notes.txt").write_text("hello")
    (root / "bad.yaml").write_text("train: [unclosed\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    (root / "corrupt_model").mkdir()
    (root / "corrupt_model" / "config.json").write_text("{not json")
    (root / "empty_dir").mkdir()
    return {"file": str(root / "a_file"), "txt": str(root / "notes.txt"), "bad_yaml": str(root / "bad.yaml"),
            "list_yaml": str(root / "list.yaml"), "corrupt": str(root / "corrupt_model"),
            "empty": str(root / "empty_dir"), "run": str(_fake_run(root)), "tmp": str(root)}


# (id, argv); "{name}" is filled from _files
CASES = [
    # top level
    ("unknown-command", ["nonsense"]),
    ("unknown-command-flag", ["--frobnicate"]),
    # info
    ("info-unknown-preset", ["info", "--preset", "nope"]),
    ("info-resolution-0", ["info", "--resolution", "0"]),
    ("info-resolution-text", ["info", "--resolution", "big"]),
    ("info-resolution-invalid", ["info", "--preset", "nano", "--resolution", "40", "--vae-factor", "8"]),
    ("info-resolution-not-multiple", ["info", "--preset", "nano", "--resolution", "33"]),
    ("info-threads-negative", ["info", "--threads", "-1"]),
    ("info-dtype", ["info", "--dtype", "fp8"]),
    ("info-repeats-0", ["info", "--repeats", "0"]),
    ("info-batch-negative", ["info", "--batch-size", "-3"]),
    # generate
    ("gen-no-prompt", ["generate"]),
    ("gen-missing-model", ["generate", "x", "-m", "/nonexistent/model"]),
    ("gen-model-is-file", ["generate", "x", "-m", "{file}"]),
    ("gen-model-empty-dir", ["generate", "x", "-m", "{empty}"]),
    ("gen-model-corrupt-config", ["generate", "x", "-m", "{corrupt}"]),
    ("gen-model-fake-run", ["generate", "x", "-m", "{run}"]),
    ("gen-guidance-nan", ["generate", "x", "--guidance", "nan"]),
    ("gen-guidance-inf", ["generate", "x", "--guidance", "inf"]),
    ("gen-guidance-huge", ["generate", "x", "--guidance", "1e30"]),
    ("gen-guidance-negative", ["generate", "x", "--guidance", "-2"]),
    ("gen-guidance-text", ["generate", "x", "--guidance", "high"]),
    ("gen-steps-0", ["generate", "x", "--steps", "0"]),
    ("gen-steps-negative", ["generate", "x", "--steps", "-4"]),
    ("gen-steps-float", ["generate", "x", "--steps", "2.5"]),
    ("gen-seed-negative", ["generate", "x", "--seed", "-1"]),
    ("gen-seed-huge", ["generate", "x", "--seed", "1e23"]),
    ("gen-seed-text", ["generate", "x", "--seed", "abc"]),
    ("gen-shift-0", ["generate", "x", "--shift", "0"]),
    ("gen-shift-negative", ["generate", "x", "--shift", "-1"]),
    ("gen-shift-nan", ["generate", "x", "--shift", "nan"]),
    ("gen-threads-negative", ["generate", "x", "--threads", "-1"]),
    ("gen-threads-huge", ["generate", "x", "--threads", "100000"]),
    ("gen-size-0", ["generate", "x", "--size", "0"]),
    ("gen-size-invalid", ["generate", "x", "-m", BASE, "--size", "33", "-o", "{tmp}/o.png"]),
    ("gen-size-too-small", ["generate", "x", "-m", BASE, "--size", "4", "-o", "{tmp}/o.png"]),
    ("gen-height-invalid", ["generate", "x", "-m", BASE, "--height", "36", "-o", "{tmp}/o.png"]),
    ("gen-num-images-0", ["generate", "x", "--num-images", "0"]),
    ("gen-upscale-0", ["generate", "x", "--upscale", "0"]),
    ("gen-output-proc", ["generate", "x", "-o", "/proc/x.png"]),
    ("gen-output-extension", ["generate", "x", "-o", "{tmp}/out.xyz"]),
    ("gen-output-no-extension", ["generate", "x", "-o", "{tmp}/out"]),
    ("gen-output-is-dir", ["generate", "x", "-o", "{tmp}"]),
    ("gen-output-parent-is-file", ["generate", "x", "-o", "{file}/out.png"]),
    ("gen-device-unknown", ["generate", "x", "-m", BASE, "--device", "tpu", "-o", "{tmp}/o.png"]),
    ("gen-device-cuda-absent", ["generate", "x", "-m", BASE, "--device", "cuda:7", "-o", "{tmp}/o.png"]),
    ("gen-unknown-flag", ["generate", "x", "--cfg", "3"]),
    # eval
    ("eval-no-model", ["eval"]),
    ("eval-missing-model", ["eval", "-m", "/nonexistent"]),
    ("eval-model-file", ["eval", "-m", "{file}"]),
    ("eval-model-corrupt", ["eval", "-m", "{corrupt}"]),
    ("eval-prompts-missing-file", ["eval", "-m", BASE, "--prompts", "/nonexistent.json"]),
    ("eval-prompts-not-json", ["eval", "-m", BASE, "--prompts", "{txt}"]),
    ("eval-prompts-unknown-set", ["eval", "-m", BASE, "--prompts", "v9"]),
    ("eval-phrasing", ["eval", "-m", BASE, "--phrasing", "train"]),
    ("eval-images-0", ["eval", "-m", BASE, "--images-per-prompt", "0"]),
    ("eval-steps-0", ["eval", "-m", BASE, "--steps", "0"]),
    ("eval-guidance-nan", ["eval", "-m", BASE, "--guidance", "nan"]),
    ("eval-shift-0", ["eval", "-m", BASE, "--shift", "0"]),
    ("eval-seed-negative", ["eval", "-m", BASE, "--seed", "-5"]),
    ("eval-batch-0", ["eval", "-m", BASE, "--batch-size", "0"]),
    ("eval-resolution-33", ["eval", "-m", BASE, "--resolution", "33", "--images-per-prompt", "1"]),
    ("eval-resolution-0", ["eval", "-m", BASE, "--resolution", "0"]),
    ("eval-grid-size-0", ["eval", "-m", BASE, "--grid-size", "0"]),
    ("eval-skip-shapes-alone", ["eval", "-m", BASE, "--skip-shapes"]),
    ("eval-output-proc", ["eval", "-m", BASE, "--output", "/proc/r.json"]),
    ("eval-output-is-dir", ["eval", "-m", BASE, "--output", "{tmp}"]),
    ("eval-details-proc", ["eval", "-m", BASE, "--details", "/proc/d.json"]),
    ("eval-grid-extension", ["eval", "-m", BASE, "--grid", "{tmp}/g.xyz"]),
    ("eval-threads-negative", ["eval", "-m", BASE, "--threads", "-2"]),
    # train
    ("train-missing-config", ["train", "/nonexistent.yaml"]),
    ("train-config-is-dir", ["train", "{tmp}"]),
    ("train-config-bad-yaml", ["train", "{bad_yaml}"]),
    ("train-config-not-mapping", ["train", "{list_yaml}"]),
    ("train-unknown-key", ["train", "--train.stepz", "5"]),
    ("train-unknown-section", ["train", "--trian.steps", "5"]),
    ("train-moved-key", ["train", "--method.shift", "3"]),
    ("train-steps-text", ["train", "--train.steps", "many"]),
    ("train-steps-0", ["train", "--train.steps", "0"]),
    ("train-steps-negative", ["train", "--train.steps", "-3"]),
    ("train-steps-float", ["train", "--train.steps", "2.5"]),
    ("train-lr-0", ["train", "--optim.lr", "0"]),
    ("train-lr-nan", ["train", "--optim.lr", "nan"]),
    ("train-lr-text", ["train", "--optim.lr", "fast"]),
    ("train-betas", ["train", "--optim.betas", "[0.9]"]),
    ("train-batch-0", ["train", "--data.batch_size", "0"]),
    ("train-resolution-0", ["train", "--data.resolution", "0"]),
    ("train-shift-0", ["train", "--schedule.shift", "0"]),
    ("train-logit-std-0", ["train", "--schedule.logit_std", "0"]),
    ("train-ema-1", ["train", "--train.ema_decay", "1"]),
    ("train-schedule-unknown", ["train", "--optim.schedule", "linear"]),
    ("train-wsd-without-decay", ["train", "--optim.schedule", "wsd"]),
    ("train-method-unknown", ["train", "--method.name", "magic"]),
    ("train-data-unknown", ["train", "--data.name", "imagenet", "--train.output_dir", "{tmp}/t1"]),
    ("train-text-unknown", ["train", "--text.encoders", "[nope]", "--train.output_dir", "{tmp}/t2"]),
    ("train-output-is-file", ["train", "--train.output_dir", "{file}", "--train.steps", "1"]),
    ("train-into-existing-run", ["train", "--train.output_dir", "{run}", "--train.steps", "1"]),
    ("train-resume-missing", ["train", "--resume", "/nonexistent/ckpt"]),
    ("train-resume-no-value", ["train", "--resume"]),
    ("train-resume-not-checkpoint", ["train", "--resume", "{empty}"]),
    ("train-resume-fake-checkpoint", ["train", "--resume", "{run}", "--train.output_dir", "{tmp}/t3"]),
    ("train-override-no-value", ["train", "--train.steps"]),
    ("train-short-flag", ["train", "-x"]),
    ("train-two-configs", ["train", "a.yaml", "b.yaml"]),
    ("train-keep-0", ["train", "--train.keep_checkpoints", "0"]),
    ("train-threads-negative", ["train", "--train.num_threads", "-1"]),
    ("train-grad-clip-negative", ["train", "--optim.grad_clip", "-1"]),
    ("train-device-unknown", ["train", "--train.device", "tpu", "--train.output_dir", "{tmp}/t4"]),
    ("train-mixed-precision", ["train", "--train.mixed_precision", "fp8"]),
    ("train-distributed", ["train", "--train.distributed", "mpi"]),
    # train-ae
    ("ae-no-output", ["train-ae"]),
    ("ae-output-is-file", ["train-ae", "-o", "{file}", "--steps", "1"]),
    ("ae-output-proc", ["train-ae", "-o", "/proc/ae", "--steps", "1"]),
    ("ae-lr-nan", ["train-ae", "-o", "{tmp}/ae", "--lr", "nan"]),
    ("ae-lr-0", ["train-ae", "-o", "{tmp}/ae", "--lr", "0"]),
    ("ae-steps-0", ["train-ae", "-o", "{tmp}/ae", "--steps", "0"]),
    ("ae-batch-0", ["train-ae", "-o", "{tmp}/ae", "--batch-size", "0"]),
    ("ae-resolution-33", ["train-ae", "-o", "{tmp}/ae", "--resolution", "33", "--steps", "1"]),
    ("ae-resolution-0", ["train-ae", "-o", "{tmp}/ae", "--resolution", "0"]),
    ("ae-preset-unknown", ["train-ae", "-o", "{tmp}/ae", "--preset", "f99", "--steps", "1"]),
    ("ae-data-unknown", ["train-ae", "-o", "{tmp}/ae", "--data", "imagenet", "--steps", "1"]),
    ("ae-data-option-no-equals", ["train-ae", "-o", "{tmp}/ae", "--data-option", "length", "--steps", "1"]),
    ("ae-data-option-unknown", ["train-ae", "-o", "{tmp}/ae", "--data-option", "colour=red", "--steps", "1"]),
    ("ae-workers-negative", ["train-ae", "-o", "{tmp}/ae", "--num-workers", "-1"]),
    ("ae-seed-negative", ["train-ae", "-o", "{tmp}/ae", "--seed", "-1"]),
    ("ae-device-unknown", ["train-ae", "-o", "{tmp}/ae", "--device", "tpu", "--steps", "1"]),
]


@pytest.mark.parametrize("argv", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_named_error(argv, tmp_path, capsys):
    names = _files(tmp_path)
    argv = [a.format(**names) for a in argv]
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("pocketdit: error:")]
    assert code == 2, (code, err[-2000:])
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "o.png").exists()


def test_the_sweep_is_wide():
    assert len(CASES) >= 100 and len({c[0] for c in CASES}) == len(CASES)
