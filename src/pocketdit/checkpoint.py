"""Checkpoint files: atomic save, resolve, load and RNG state, used by the trainer and the pipeline.

A training checkpoint is a directory `output_dir/checkpoint-XXXXXXX/`:
    transformer/  config.json + diffusion_pytorch_model.safetensors   (diffusers layout, from_pretrained works)
    ema/          the same, with the EMA weights
    optimizer.pt  AdamW state (loaded with torch.load(weights_only=True))
    rng.safetensors + rng.json   RNG states of every rank
    trainer_state.json           step, data position, EMA updates, world size, the config
It is written to `checkpoint-XXXXXXX.tmp-*` and renamed when complete; `output_dir/latest` (written then
renamed) names the newest. A crash mid-save therefore never damages the previous checkpoint.

    ckpt = resolve_checkpoint("runs/shapes")          # a run directory -> its latest checkpoint
    model = load_checkpoint_weights(ckpt, ema=True)   # a PocketDiT with the EMA weights
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

METHOD_MODULES_FILE = "method_modules.safetensors"
METHOD_OPTIMIZER_FILE = "method_optimizer.pt"

__all__ = [
    "CheckpointError",
    "METHOD_MODULES_FILE",
    "METHOD_OPTIMIZER_FILE",
    "MODEL_WEIGHTS",
    "CHECKPOINT_PREFIX",
    "resolve_checkpoint",
    "check_checkpoint_files",
    "read_safetensors",
    "load_checkpoint_weights",
    "load_pretrained_transformer",
    "grow_model",
    "save_weights_dir",
    "write_checkpoint",
    "prune_checkpoints",
    "clean_temp_dirs",
    "read_training_state",
    "load_optimizer_state",
    "rng_state",
    "set_rng_state",
    "restore_rng_state",
]

MODEL_WEIGHTS = "diffusion_pytorch_model.safetensors"
CHECKPOINT_PREFIX = "checkpoint-"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or unreadable."""


# ----------------------------------------------------------------------------------------------------
# Finding and reading
# ----------------------------------------------------------------------------------------------------
def resolve_checkpoint(path) -> Path:
    """A checkpoint directory, or a run directory (its `latest` checkpoint) -> the checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p} (pass a run directory or one of its checkpoint-* directories)")
    if (p / "trainer_state.json").is_file() or (p / "transformer").is_dir():
        return p
    latest = p / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        ckpt = p / name
        if not ckpt.is_dir():
            raise CheckpointError(f"{latest} names {name!r} but {ckpt} does not exist; the run directory is damaged")
        return ckpt
    raise CheckpointError(
        f"{p} is neither a checkpoint (no trainer_state.json) nor a run directory with a 'latest' file"
    )


def check_checkpoint_files(ckpt: Path, need_training_state: bool = True):
    required = ["transformer/config.json", f"transformer/{MODEL_WEIGHTS}", "ema/config.json", f"ema/{MODEL_WEIGHTS}"]
    if need_training_state:
        required += ["trainer_state.json", "optimizer.pt", "rng.safetensors", "rng.json"]
    missing = [r for r in required if not (ckpt / r).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: missing {missing}. Pass an earlier checkpoint.")


def read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"cannot read {path}: {e} (the file is corrupt or truncated)") from e


def load_checkpoint_weights(path, ema: bool = True, model_cls=None):
    """Build the model stored in a checkpoint (or a run's latest one); EMA weights by default."""
    if model_cls is None:
        from .model import PocketDiT as model_cls
    ckpt = resolve_checkpoint(path)
    check_checkpoint_files(ckpt, need_training_state=False)
    sub = ckpt / ("ema" if ema else "transformer")
    try:
        config = json.loads((sub / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{sub / 'config.json'} is not valid JSON: {e}") from e
    model = model_cls.from_config(config)
    state = read_safetensors(sub / MODEL_WEIGHTS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if any("lora_" in k or ".base_layer." in k for k in unexpected):
        raise CheckpointError(
            f"{sub}: this checkpoint holds the LoRA adapters of a distillation run (pocketdit distill), not a plain "
            "model; the fused model is the run's output directory (the folder above train/)"
        )
    if missing or unexpected:
        raise CheckpointError(f"{sub}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model


def load_pretrained_transformer(path):
    """A PocketDiT from a diffusers-layout directory, a pipeline directory (its transformer/) or a checkpoint."""
    from .model import PocketDiT

    p = Path(path)
    if (p / "config.json").is_file() and (p / MODEL_WEIGHTS).is_file():
        model = PocketDiT.from_pretrained(str(p))
    elif (p / "transformer" / "config.json").is_file() and not (p / "trainer_state.json").is_file():
        model = PocketDiT.from_pretrained(str(p / "transformer"))
    else:
        model = load_checkpoint_weights(p, ema=True)
    return model


def _same(a, b) -> bool:
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # JSON configs hold lists, overrides tuples
    return norm(a) == norm(b)


def grow_model(model, overrides: dict, source: str = "the pretrained model"):
    """(model rebuilt with `overrides` applied to its config and its weights copied in, names of the new modules).

    Settings that add modules (`text_refiner_depth=2`; `elastic_widths=[0.5, 1.0]` on a plain model) grow a trained
    model: new modules keep their initialisation (a refiner starts as the identity; a width's private tables start
    as the slice of the trained full-width ones). An override that would change the shape of a loaded weight is an
    error naming it. Overrides equal to the model's config change nothing.
    """
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    changed = {k: v for k, v in overrides.items() if not _same(config.get(k), v)}
    if not changed:
        return model, []
    unknown = sorted(set(changed) - set(config))
    if unknown:
        raise ValueError(f"unknown PocketDiT config key(s) {unknown} for {source}")
    grown = type(model)(**{**config, **changed})
    own = grown.state_dict()
    loaded = model.state_dict()
    bad = [f"{k} {tuple(v.shape)} -> {tuple(own[k].shape)}" if k in own else f"{k} (gone)"
           for k, v in loaded.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(
            f"model overrides {changed} on top of {source} change or drop weights it has: {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}. Only settings that add modules (text_refiner_depth, elastic_widths) "
            "can be applied to pretrained weights; for a different architecture train without model.pretrained"
        )
    missing = grown.load_state_dict(loaded, strict=False).missing_keys
    if grown.elastic_widths and not model.elastic_widths:
        from .elastic import init_private_from_full

        init_private_from_full(grown)  # a width's private tables start as the slice of the trained full-width ones
    new = sorted({k.split(".")[0] if not k.startswith(("down_blocks", "mid_blocks", "up_blocks")) else k.rsplit(".", 2)[0]
                  for k in missing})
    return grown, new


def read_training_state(ckpt: Path) -> tuple[dict, list]:
    """(trainer_state.json, rng.json) of a complete checkpoint."""
    try:
        return json.loads((ckpt / "trainer_state.json").read_text()), json.loads((ckpt / "rng.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt}: trainer_state.json or rng.json is not valid JSON ({e})") from e


def load_optimizer_state(ckpt: Path, name: str = "optimizer.pt") -> dict:
    try:
        return torch.load(ckpt / name, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {ckpt / name}: {e}") from e


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
def save_weights_dir(directory: Path, config, state: dict, class_name: str):
    """Diffusers layout (config.json + diffusion_pytorch_model.safetensors), so from_pretrained reads it."""
    import diffusers
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    config.update(_class_name=class_name, _diffusers_version=diffusers.__version__)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=list))
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(directory / MODEL_WEIGHTS))


def write_checkpoint(final: Path, model_config, class_name: str, model_state: dict, ema_state: dict,
                     optimizer_state: dict, rng: list, trainer_state: dict, method_modules: Optional[dict] = None,
                     method_optimizer: Optional[dict] = None) -> Path:
    """Write a complete checkpoint to `final` atomically and point `final.parent/latest` at it.

    `rng` holds one `rng_state()` pair per rank; `trainer_state` becomes trainer_state.json. A method's own
    trainable modules (KD projectors, a critic) go to method_modules.safetensors and their optimizer state to
    method_optimizer.pt.
    """
    from safetensors.torch import save_file

    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_weights_dir(tmp / "transformer", model_config, model_state, class_name)
    save_weights_dir(tmp / "ema", model_config, ema_state, class_name)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    rng_tensors, rng_meta = {}, []
    for r, (tensors, meta) in enumerate(rng):
        rng_tensors.update({f"rank{r}.{k}": v.contiguous() for k, v in tensors.items()})
        rng_meta.append(meta)
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "rng.json").write_text(json.dumps(rng_meta))
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    if method_modules:
        save_file({k: v.detach().cpu().contiguous() for k, v in method_modules.items()},
                  str(tmp / METHOD_MODULES_FILE))
    if method_optimizer is not None:
        torch.save(method_optimizer, tmp / METHOD_OPTIMIZER_FILE)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): swap atomically enough, old one last
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    latest_tmp = final.parent / f"latest.tmp-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, final.parent / "latest")
    return final


def prune_checkpoints(output_dir: Path, keep_last: int, keep: Optional[Path] = None):
    """Delete all but the newest `keep_last` checkpoints of a run (never `keep`)."""
    ckpts = sorted(
        p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()
    )
    for p in ckpts[: max(0, len(ckpts) - keep_last)]:
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)


# Keys a resumed run may change without --allow-config-change: how long, where, how often to log and sample,
# how many CPU threads, which attention kernel (same math). Anything else changes what is trained, so it must be asked for.
RESUME_SAFE_KEYS = frozenset({
    "train.steps", "train.output_dir", "train.resume", "train.overwrite", "train.allow_config_change",
    "train.log_every", "train.sample_every", "train.checkpoint_every", "train.keep_checkpoints", "train.num_threads",
    "train.progress", "train.attention_backend", "train.sample_prompts", "train.sample_steps", "train.sample_guidance", "data.num_workers",
})
RUN_FILES = ("config.json", "metrics.jsonl", "latest", "loss.png", "samples", "config_changes.jsonl")


class RunExistsError(FileExistsError):
    """A fresh run was pointed at a directory that already holds one."""


def run_contents(output_dir: Path) -> list[str]:
    """The names in `output_dir` that belong to a training run (empty if none, or no such directory)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    return sorted(p.name for p in output_dir.iterdir() if p.name in RUN_FILES or p.name.startswith(CHECKPOINT_PREFIX))


def prepare_fresh_run_dir(output_dir: Path, overwrite: bool = False) -> None:
    """Refuse to start a run in a directory that holds one, unless `overwrite` (then delete that run's files:
    new checkpoints beside old ones, or an old `latest`, would make a later --resume pick the wrong one)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RunExistsError(f"train.output_dir {output_dir} is a file, not a directory")
    found = run_contents(output_dir)
    if not found:
        return
    if not overwrite:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunExistsError(
            f"train.output_dir {output_dir} already holds a run ({shown}); continue it with --resume auto, "
            f"start over with --overwrite (deletes it), or choose another --train.output_dir"
        )
    for name in found:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def changed_config_keys(saved: dict, current: dict, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (saved value, current value)} for every leaf that differs between two config dicts."""
    changes = {}
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(changed_config_keys(a, b, f"{dotted}."))
        elif a != b:
            changes[dotted] = (a, b)
    return changes


def check_resume_config(saved: dict, current: dict, allow_change: bool, source: Path) -> dict[str, tuple]:
    """The changes a resume makes to the run's config; an error naming them unless they are safe or allowed."""
    changes = changed_config_keys(saved, current)
    unsafe = {k: v for k, v in changes.items() if k not in RESUME_SAFE_KEYS}
    if unsafe and not allow_change:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(unsafe.items())[:6])
        if len(unsafe) > 6:
            listed += f"; and {len(unsafe) - 6} more"
        raise CheckpointError(
            f"resuming changes the run's config ({source}): {listed}. Resume with the same values, or pass "
            f"--allow-config-change to accept them"
        )
    return unsafe


def clean_temp_dirs(output_dir: Path):
    """Remove half-written checkpoints left by a crash during a save."""
    for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path):
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------
# RNG state
# ----------------------------------------------------------------------------------------------------
def rng_state(generator: torch.Generator) -> tuple[dict, dict]:
    """(tensors, JSON-able meta) of the torch, CUDA, numpy and Python RNGs and `generator`."""
    tensors = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    np_state = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict, generator: torch.Generator):
    """Inverse of `rng_state`."""
    torch.set_rng_state(tensors["torch"])
    generator.set_state(tensors["generator"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


def restore_rng_state(ckpt: Path, rank: int, rng_meta: list, generator: torch.Generator):
    """Set every RNG (and `generator`) to what rank `rank` saved in the checkpoint."""
    rng_tensors = read_safetensors(ckpt / "rng.safetensors")
    mine = {k.split(".", 1)[1]: v for k, v in rng_tensors.items() if k.startswith(f"rank{rank}.")}
    set_rng_state(mine, rng_meta[rank], generator)
