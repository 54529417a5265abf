"""`pocketdit distill`: few-step distillation (K-DMD or plain DMD) from a config, written out as a pipeline.

    pocketdit distill configs/shapes_pixel32.yaml --method kdmd --student checkpoints/shapes-base \\
        --teacher checkpoints/shapes-base --few-step-teacher runs/dmd4 --steps 4 [--width 0.5] -o runs/kdmd4

The config gives the data, text encoders and autoencoder; the student starts from `--student` (default: the
teacher). Training runs in OUT/train/ (the usual run directory: checkpoints, metrics, sample grids, --resume);
at the end the student's LoRA is fused into its weights and OUT/ becomes a normal PocketDiT pipeline whose
defaults are the distilled schedule: `pocketdit generate -m OUT` samples in `--steps` steps without guidance.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch

DISTILL_METHODS = ("kdmd", "dmd")

# Settings where distillation differs from pretraining unless the user overrides them (DMD2 / SnapGen++).
DISTILL_DEFAULTS = {
    "optim.betas": [0.0, 0.99],
    "optim.lr": 1.0e-4,
    "optim.warmup_steps": 0,
    "optim.schedule": "constant",
    "train.ema_decay": 0.0,
    "text.dropout": 0.0,
}


def distill_overrides(method: str, student: Optional[str], teacher: Optional[str], few_step_teacher: Optional[str],
                      steps: int, width: Optional[float], iterations: Optional[int], output: Path) -> list[str]:
    """The `--section.key value` overrides that `pocketdit distill`'s flags stand for."""
    if method not in DISTILL_METHODS:
        raise ValueError(f"--method {method!r}: choose one of {DISTILL_METHODS}")
    student = student or teacher
    if student is None:
        raise ValueError("pass --student (the model to distil) or --teacher (then the student starts from it)")
    out = ["--method.name", method, "--model.pretrained", str(student), "--method.num_steps", str(int(steps)),
           "--train.sample_steps", str(int(steps)), "--train.sample_guidance", "1.0",
           "--train.output_dir", str(Path(output) / "train")]
    if teacher is not None:
        out += ["--method.teacher", str(teacher)]
    if few_step_teacher is not None:
        out += ["--method.few_step_teacher", str(few_step_teacher)]
    if width is not None:
        out += ["--method.width", str(float(width))]
    if iterations is not None:
        out += ["--train.steps", str(int(iterations))]
    return out


def apply_distill_defaults(cfg, user_overrides) -> None:
    """Set DISTILL_DEFAULTS on `cfg` for every key the user did not override on the command line."""
    given = {tok[2:].split("=", 1)[0].replace("-", "_") for tok in user_overrides if tok.startswith("--")}
    for key, value in DISTILL_DEFAULTS.items():
        if key in given:
            continue
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)


def write_distilled_pipeline(trainer, output: Path, resolution: int) -> Path:
    """OUT/ <- the trainer's student with its LoRA fused, with the distilled schedule as the pipeline default."""
    from .pipeline import PocketDiTPipeline, make_scheduler
    from .utils import atomic_directory

    method = trainer.method
    student = method.fused_student()
    pipe = PocketDiTPipeline(
        student, make_scheduler(method.shift), method.text_conditioner, method.autoencoder,
        default_size=resolution, default_steps=method.num_steps, default_guidance=1.0,
    )
    output = Path(output)
    staged = output.with_name(output.name + ".pipeline-staging")
    with atomic_directory(staged) as staging:
        pipe.save_pretrained(staging)
    # OUT holds train/ and the pipeline: each component folder is renamed in, model_index.json last, so a crash
    # midway leaves no model_index.json (the directory then does not pass for a pipeline) and a rerun redoes it.
    (output / "model_index.json").unlink(missing_ok=True)
    items = sorted(staged.iterdir(), key=lambda p: p.name == "model_index.json")
    for item in items:
        target = output / item.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(item, target)
    shutil.rmtree(staged, ignore_errors=True)
    return output


def record_teacher_cache(trainer, progress: bool = True) -> int:
    """Walk the trainer's data/noise stream for `train.steps` steps and record the KD teacher's answers in its
    `method.teacher_cache`, without training the student (`pocketdit teacher-cache`). Steps already recorded are
    checked and skipped, so an interrupted recording resumes; returns how many steps were computed."""
    from .teachers.cache import TeacherCache

    method = trainer.method
    cache = getattr(method, "cache", None)
    if not isinstance(cache, TeacherCache) or method.teacher is None:
        raise ValueError("recording a teacher cache needs method.name: kd with method.teacher and method.teacher_cache")
    rank = trainer.dist.rank
    steps = trainer.tcfg.steps
    bar = None
    if progress and trainer.dist.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="teacher cache", dynamic_ncols=True)
    computed = 0
    batches = trainer._batches()
    try:
        for step in range(steps):
            _, _, _, batch = next(batches)
            method.global_step = step
            fresh = (step, rank) not in cache
            with torch.no_grad():
                method.step_inputs(batch)  # the student's noisy batch; the teacher runs (and is recorded) if fresh
            computed += int(fresh)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return computed
