"""`train_autoencoder` (`pocketdit train-ae`): a TinyAutoencoder trained by the shared Trainer.

The run is the "autoencoder" training method (pocketdit.methods.autoencoder) on `Trainer`, so it has the
trainer's checkpoints and exact resume (in `out_dir/train/`), EMA, progress bar, metrics and DDP under
torchrun. When training ends the latent normalisation is fitted and the model is exported to `out_dir`:

    out_dir/config.json, diffusion_pytorch_model.safetensors   the model (`load_autoencoder(out_dir)`)
    out_dir/reconstruction.png                                 preview inputs over their reconstructions
    out_dir/train_log.jsonl                                    one line per step (a copy of train/metrics.jsonl)
    out_dir/train/                                             the Trainer's run: checkpoint-*/, samples/, loss.png

This lives beside the trainer rather than in pocketdit.autoencoder, which the trainer itself imports.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import List, Optional, Union

import torch

from .autoencoder import InvalidImageSizeError, TinyAutoencoder
from .config import TrainSection, config_from_dict
from .distributed import barrier
from .methods import build_method
from .methods.autoencoder import ImageCollate, save_reconstruction_png
from .trainer import Trainer

__all__ = ["train_autoencoder", "AutoencoderTrainingResult"]


@dataclass
class AutoencoderTrainingResult:
    model: TinyAutoencoder
    out_dir: Path
    losses: List[float] = field(default_factory=list)  # the steps run by this call (after the resumed step)
    reconstruction_path: Optional[Path] = None
    final_l1: Optional[float] = None  # mean L1 reconstruction error of the saved model on the PNG batch, [-1, 1] scale


def _atomic_save(model: TinyAutoencoder, out_dir: Path):
    """save_pretrained into a temp dir beside out_dir, then os.replace each file into place (atomic per file;
    the weights file, which holds the normalisation buffers, is the only one that changes between saves)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save-", dir=out_dir))
    try:
        model.save_pretrained(tmp)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_atomic(src: Path, dst: Path):
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def train_autoencoder(
    dataset,
    out_dir: Union[str, os.PathLike],
    steps: int = 2000,
    batch_size: int = 16,
    lr: float = 1e-3,
    resolution: int = 64,
    model: Optional[TinyAutoencoder] = None,
    preset: str = "f4c4",
    model_config: Optional[dict] = None,
    edge_weight: float = 0.5,
    latent_l2_weight: float = 1e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 50,
    grad_clip: float = 1.0,
    save_every: int = 0,
    stats_batches: int = 8,
    num_workers: int = 0,
    device: Union[str, torch.device, None] = "auto",
    seed: int = 0,
    progress: bool = True,
    resume: Union[bool, str] = False,
) -> AutoencoderTrainingResult:
    """Train a TinyAutoencoder on a dataset of `{"image": (3, H, W) in [-1, 1], ...}` samples.

    Images are center-cropped and resized to `resolution`. AdamW (betas 0.9, 0.99; `weight_decay` on every
    parameter, as the trainer does) with linear warmup and cosine decay to 10% of `lr`; loss = L1 + edge_weight * edge L1 + latent_l2_weight * mean(z^2). The model
    is built from `model_config` (TinyAutoencoder kwargs) or `preset` unless `model` is given. Every
    `save_every` steps (0: the trainer's default, 500) a checkpoint goes to `out_dir/train/` and a
    reconstruction of the preview batch by the EMA weights to `out_dir/train/samples/`. `resume`: True or
    "auto" continues from the latest checkpoint in `out_dir/train/` (a fresh run when there is none), a path
    from that checkpoint; without it an earlier run in `out_dir/train/` is deleted first. At the end the
    latent normalisation is fitted on `stats_batches` batches and the raw (not EMA) weights are saved to
    `out_dir` (see the module docstring for the files).
    """
    for key, value in [("steps", steps), ("batch_size", batch_size), ("resolution", resolution),
                       ("stats_batches", stats_batches)]:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"train_autoencoder: {key} must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"train_autoencoder: lr must be > 0, got {lr!r}")
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {str(out_dir)!r} exists and is not a directory")
    torch.manual_seed(seed)  # the model's initial weights
    if model is None:
        model = TinyAutoencoder(**model_config) if model_config is not None else TinyAutoencoder.from_preset(preset)
    if resolution % model.downsample_factor:
        raise InvalidImageSizeError(
            f"resolution {resolution} is not a multiple of the autoencoder's downsample factor "
            f"{model.downsample_factor}"
        )
    is_iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    if not is_iterable and len(dataset) < batch_size:
        raise ValueError(f"dataset has {len(dataset)} images, fewer than batch_size={batch_size}")
    collate = ImageCollate(resolution)
    preview = next(iter(torch.utils.data.DataLoader(dataset, batch_size=min(8, batch_size), collate_fn=collate)))

    every = save_every or TrainSection.checkpoint_every
    cfg = config_from_dict({
        "data": {"name": type(dataset).__name__, "resolution": resolution, "batch_size": batch_size,
                 "num_workers": num_workers},
        "method": {"name": "autoencoder", "edge_weight": edge_weight, "latent_l2_weight": latent_l2_weight},
        "optim": {"lr": lr, "betas": [0.9, 0.99], "weight_decay": weight_decay, "warmup_steps": warmup_steps,
                  "schedule": "cosine", "min_lr_ratio": 0.1, "grad_clip": grad_clip or 0.0},
        "train": {"steps": steps, "seed": seed, "output_dir": str(out_dir / "train"),
                  "resume": "auto" if resume is True else str(resume or ""),
                  # as train-ae always did, a fresh run replaces what out_dir held (here: its train/ run)
                  "overwrite": not resume,
                  "log_every": 1, "sample_every": every, "checkpoint_every": every,
                  # fp32 as before; a conv autoencoder has no gradient checkpointing
                  "mixed_precision": "no", "gradient_checkpointing": False,
                  "device": "auto" if device is None else str(device), "progress": progress},
    })
    method = build_method("autoencoder", model=model, text_conditioner=None, autoencoder=None,
                          edge_weight=edge_weight, latent_l2_weight=latent_l2_weight, preview=preview["image"])
    trainer = Trainer(method, dataset, cfg, collate_fn=collate)
    losses = list(trainer.train().values())

    model = trainer.model.eval()  # the unwrapped module, raw weights
    # Every rank fits the same statistics (same data, same weights); the main one writes the files.
    stats = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=not is_iterable, collate_fn=collate, num_workers=num_workers,
        generator=None if is_iterable else torch.Generator().manual_seed(seed),
    )
    model.fit_latent_normalization(b["image"] for b in islice(stats, stats_batches))
    recon = method.reconstruct(model)
    png = out_dir / "reconstruction.png"
    if trainer.dist.is_main:
        _atomic_save(model, out_dir)
        save_reconstruction_png(preview["image"], recon, png)
        _copy_atomic(trainer.output_dir / "metrics.jsonl", out_dir / "train_log.jsonl")
    barrier(trainer.dist)
    return AutoencoderTrainingResult(model=model, out_dir=out_dir, losses=losses, reconstruction_path=png,
                                     final_l1=(recon - preview["image"]).abs().mean().item())
