"""kill -9 in the middle of writing leaves the previous state loadable, and the next run succeeds.

Each case runs the real code in a subprocess that SIGKILLs itself at a chosen point inside the write (no
exception handlers, no finally blocks run: what a power cut or the OOM killer does)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent


def _run_killed(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "killed.py"
    path.write_text(textwrap.dedent(script))
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    return proc


def test_kill_during_a_checkpoint_save_then_resume(tmp_path):
    out = tmp_path / "run"
    _run_killed(f"""
        import os, signal, torch
        import pocketdit.checkpoint as ckpt
        from test_trainer import run

        real, calls = torch.save, {{"n": 0}}
        def save_then_die(obj, f, *a, **k):  # the optimizer state of the 2nd checkpoint: half written, then SIGKILL
            calls["n"] += 1
            real(obj, f, *a, **k)
            if calls["n"] == 2:
                with open(f, "r+b") as fh:
                    fh.truncate(100)
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.torch.save = save_then_die
        run({str(out)!r}, 9)
    """, tmp_path)
    assert (out / "latest").read_text().strip() == "checkpoint-0000003"  # the save in progress never became latest
    assert list(out.glob("checkpoint-0000006.tmp-*")), "the half-written checkpoint is left as a temp dir"

    sys.path.insert(0, str(TESTS))
    from test_trainer import run

    from pocketdit.checkpoint import load_checkpoint_weights

    assert load_checkpoint_weights(out / "checkpoint-0000003", ema=True) is not None
    trainer, losses = run(out, 9, "--train.resume", "auto")
    assert list(losses) == list(range(4, 10)) and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert not list(out.glob("*.tmp-*")) and (out / "latest").read_text().strip() == "checkpoint-0000009"


BASE = str(TESTS.parent / "checkpoints" / "shapes-base")


def test_kill_during_quantize_output_keeps_the_previous_output(tmp_path):
    from pocketdit.cli import main
    from pocketdit.quantize import load_denoiser

    out = tmp_path / "q"
    assert main(["quantize", BASE, "--scheme", "int8", "-o", str(out)]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    _run_killed(f"""
        import os, signal, safetensors.torch as st
        from pocketdit.cli import main

        real = st.save_file
        def save_then_die(tensors, path, *a, **k):  # the new weights half on disk, then SIGKILL
            real(tensors, path, *a, **k)
            with open(path, "r+b") as fh:
                fh.truncate(64)
            os.kill(os.getpid(), signal.SIGKILL)
        st.save_file = save_then_die
        main(["quantize", {BASE!r}, "--scheme", "int8", "-o", {str(out)!r}, "--overwrite"])
    """, tmp_path)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert load_denoiser(out / "transformer") is not None  # the previous output still loads
    assert main(["quantize", BASE, "--scheme", "int8", "-o", str(out), "--overwrite"]) == 0
    assert not list(tmp_path.glob(".q.tmp-*"))  # the killed run's staging folder is gone


def test_kill_during_export_keeps_the_previous_export(tmp_path):
    from pocketdit.cli import main

    out = tmp_path / "e"
    args = ["export", BASE, "--format", "onnx", "--resolution", "32", "-o", str(out)]
    assert main(args) == 0
    manifest = (out / "export.json").read_text()
    _run_killed(f"""
        import os, signal
        import pocketdit.export as ex
        from pocketdit.cli import main

        real, calls = ex.export_graph, {{"n": 0}}
        def export_then_die(spec, fmt, path, *a, **k):  # one graph written, the next one cut off
            calls["n"] += 1
            if calls["n"] == 2:
                path.write_bytes(b"partial")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(spec, fmt, path, *a, **k)
        ex.export_graph = export_then_die
        main({args!r} + ["--overwrite"])
    """, tmp_path)
    assert (out / "export.json").read_text() == manifest
    import onnx

    for graph in ("text_encoder.onnx", "denoiser.onnx"):
        onnx.checker.check_model(str(out / graph))
    assert main(args + ["--overwrite"]) == 0
