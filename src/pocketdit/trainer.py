"""The training loop: devices, AdamW + warm-up, grad clipping, EMA, checkpoints, logs, sample grids.

A training method (pocketdit.methods) turns a batch into losses; the Trainer does everything else:

    trainer = build_trainer(load_config("configs/shapes_nano.yaml", ["--train.steps", "100"]))
    trainer.train()

Checkpoints (`output_dir/checkpoint-XXXXXXX/`, written atomically) are described in pocketdit.checkpoint;
torchrun (DDP / FSDP2) set-up lives in pocketdit.distributed and the weight average in pocketdit.ema.

Resuming restores weights, EMA, optimizer, step, the data position (the order is a seeded permutation
per epoch, so it is a pure function of seed, epoch and position) and every RNG the method draws from,
so a resumed run produces the same losses as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn

from .checkpoint import (
    CHECKPOINT_PREFIX,
    METHOD_MODULES_FILE,
    METHOD_OPTIMIZER_FILE,
    MODEL_WEIGHTS,
    CheckpointError,
    check_checkpoint_files,
    check_resume_config,
    clean_temp_dirs,
    load_optimizer_state,
    grow_model,
    load_pretrained_transformer,
    prepare_fresh_run_dir,
    prune_checkpoints,
    read_safetensors,
    read_training_state,
    resolve_checkpoint,
    restore_rng_state,
    rng_state,
    write_checkpoint,
)
from .config import TrainConfig, config_to_dict
from .distributed import (
    all_gather_objects,
    all_reduce_mean,
    barrier,
    full_model_state,
    full_optimizer_state,
    full_tensor,
    load_full_model_state,
    load_full_optimizer_state,
    setup_distributed,
    wrap_model,
)
from .ema import EMA

__all__ = [
    "Trainer",
    "build_trainer",
    "build_components",
    "NonFiniteLossError",
    "EpochBatchSampler",
    "plot_metrics",
]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the optimizer step."""

    def __init__(self, message: str, step: int, epoch: int, batch_index: int):
        super().__init__(message)
        self.step, self.epoch, self.batch_index = step, epoch, batch_index


# ----------------------------------------------------------------------------------------------------
# Data order that can be resumed
# ----------------------------------------------------------------------------------------------------
class EpochBatchSampler:
    """Batches of dataset indices: a seeded permutation per epoch, split across ranks, last partial batch dropped.

    The order is a pure function of (seed, epoch), so the position (epoch, batch index) is all a
    checkpoint needs to continue the same sequence.
    """

    def __init__(self, dataset_len: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.dataset_len, self.batch_size, self.seed = int(dataset_len), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        if self.num_batches == 0:
            raise ValueError(
                f"the dataset has {dataset_len} samples: too few for one batch of {batch_size} on each of "
                f"{world_size} process(es); lower data.batch_size or use a larger dataset"
            )

    @property
    def num_batches(self) -> int:
        return (self.dataset_len // self.world_size) // self.batch_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.dataset_len, generator=g)
        per_rank = self.dataset_len // self.world_size
        mine = perm[self.rank * per_rank : (self.rank + 1) * per_rank].tolist()
        n = self.num_batches
        return [mine[i * self.batch_size : (i + 1) * self.batch_size] for i in range(n)]


def _batch_len(batch) -> int:
    """Samples in a batch: its captions, or the first dimension of its images (batches without text)."""
    return len(batch["caption"]) if "caption" in batch else len(batch["image"])


def _default_collate(samples):
    try:
        from .data import collate

        return collate(samples)
    except ImportError:
        out = {"image": torch.stack([s["image"] for s in samples]), "caption": [s["caption"] for s in samples]}
        out["meta"] = [s.get("meta", {}) for s in samples]
        return out


# ----------------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------------
class Trainer:
    """Runs a training method. See the module docstring for what a checkpoint holds.

    Args:
        method: a TrainingMethod (its `.model` is trained; text conditioner/autoencoder are used for samples).
        dataset: map-style dataset of {"image", "caption", "meta"} dicts (or an IterableDataset).
        config: the full TrainConfig (only optim/train/data.batch_size/num_workers are read here; the rest is
            stored in checkpoints so a run documents itself).
        collate_fn: batches samples; pocketdit.data.collate by default.
    """

    def __init__(self, method, dataset, config: TrainConfig, collate_fn: Optional[Callable] = None):
        self.method = method
        self.dataset = dataset
        self.config = config
        self.tcfg, self.ocfg = config.train, config.optim
        self.collate_fn = collate_fn or _default_collate
        self.output_dir = Path(self.tcfg.output_dir)
        if self.tcfg.num_threads:
            torch.set_num_threads(self.tcfg.num_threads)
        self.dist = setup_distributed(self.tcfg.distributed, self.tcfg.device)
        device = self.dist.device

        model = method.model
        self.model_cls = type(model)
        self.model_config = dict(model.config) if hasattr(model, "config") else {}
        if self.tcfg.attention_backend != "auto":
            if not hasattr(model, "set_attention_backend"):
                raise ValueError(f"{type(model).__name__} has no set_attention_backend")
            model.set_attention_backend(self.tcfg.attention_backend)
        model.to(device)
        method.to(device)
        model.train()
        self.mixed_precision = self.tcfg.mixed_precision
        if self.mixed_precision == "auto":
            self.mixed_precision = "bf16" if device.type == "cuda" else "no"
        grad_ckpt = self.tcfg.gradient_checkpointing
        if grad_ckpt == "auto":
            grad_ckpt = device.type == "cuda"
        if grad_ckpt:
            if not hasattr(model, "enable_gradient_checkpointing"):
                raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
            model.enable_gradient_checkpointing()

        # Wrap for data parallelism; self.model stays the unwrapped module (same parameters).
        self.model = model
        wrapped = wrap_model(model, self.dist)
        self.ema = EMA(model, self.tcfg.ema_decay)
        if self.tcfg.compile:
            wrapped = torch.compile(wrapped)
        method.model = wrapped

        params = method.trainable_parameters()
        if not params:
            raise ValueError("the training method has no trainable parameters")
        self.params = params
        self.optimizer = torch.optim.AdamW(
            params, lr=self.ocfg.lr, betas=tuple(self.ocfg.betas), eps=self.ocfg.eps, weight_decay=self.ocfg.weight_decay
        )
        # A method's own trainable modules (KD projectors, a critic): replicated on every rank, their gradients
        # averaged by hand, their own optimizer (so the model's FSDP/DDP optimizer state keeps its layout).
        self.method_modules = dict(method.extra_modules())
        for m in self.method_modules.values():
            m.to(device).train()
        self.method_params = [p for m in self.method_modules.values() for p in m.parameters() if p.requires_grad]
        self.method_optimizer = None
        if self.method_params:
            self.method_optimizer = torch.optim.AdamW(
                self.method_params, lr=self.ocfg.lr, betas=tuple(self.ocfg.betas), eps=self.ocfg.eps,
                weight_decay=self.ocfg.weight_decay,
            )
        method.generator = torch.Generator().manual_seed(self.tcfg.seed * 1_000_003 + 7919 * self.dist.rank)
        self.generator = method.generator

        self.step = 0  # completed optimizer steps
        self.epoch = 0
        self.batch_in_epoch = 0  # next batch to take within self.epoch
        self.losses: dict[int, float] = {}
        self.last_checkpoint: Optional[Path] = None
        self.sampler = None
        if hasattr(dataset, "__len__") and not isinstance(dataset, torch.utils.data.IterableDataset):
            self.sampler = EpochBatchSampler(
                len(dataset), config.data.batch_size, self.tcfg.seed, self.dist.rank, self.dist.world_size
            )
        self._sample_model = None

    # ------------------------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant, cosine or wsd."""
        base, warm = self.ocfg.lr, self.ocfg.warmup_steps
        if warm > 0 and step < warm:
            return base * (step + 1) / warm
        if self.ocfg.schedule == "cosine":
            total = max(1, self.tcfg.steps - warm)
            progress = min(1.0, (step - warm) / total)
            floor = self.ocfg.min_lr_ratio
            return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))
        if self.ocfg.schedule == "wsd":
            start = self.tcfg.steps - self.ocfg.decay_steps
            if step < start:
                return base
            progress = min(1.0, (step - start + 1) / self.ocfg.decay_steps)
            floor = self.ocfg.min_lr_ratio
            return base * (floor + (1 - floor) * (1 - progress))
        return base

    def _autocast(self):
        if self.mixed_precision == "bf16":
            return torch.autocast(device_type=self.dist.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _batches(self) -> Iterator[tuple[int, int, list, dict]]:
        """Yields (epoch, batch index in epoch, dataset indices or None, batch) from the saved position on."""
        from torch.utils.data import DataLoader

        nw = self.config.data.num_workers
        # The position is read once here; afterwards the generator keeps its own (train() updates self.* per step).
        epoch, start = self.epoch, self.batch_in_epoch
        while True:
            if self.sampler is not None:
                batches = self.sampler.epoch_batches(epoch)
                todo = batches[start:]
                if todo:
                    loader = DataLoader(self.dataset, batch_sampler=todo, collate_fn=self.collate_fn, num_workers=nw)
                    for i, batch in enumerate(loader):
                        yield epoch, start + i, todo[i], batch
            else:  # iterable dataset: replay the epoch and skip what was consumed
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(epoch)
                loader = DataLoader(
                    self.dataset, batch_size=self.config.data.batch_size, collate_fn=self.collate_fn, num_workers=nw,
                    drop_last=True,
                )
                n = -1
                for n, batch in enumerate(loader):
                    if n >= start:
                        yield epoch, n, None, batch
                if n < 0:
                    raise RuntimeError("the dataset yielded no complete batch")
            epoch, start = epoch + 1, 0

    # ------------------------------------------------------------------------------------------------
    def train(self) -> dict[int, float]:
        """Train to `train.steps` optimizer steps; returns {step: loss} for the steps run in this call."""
        tcfg = self.tcfg
        config = json.loads(json.dumps(config_to_dict(self.config)))
        changes, source = {}, None
        if not tcfg.resume:
            if not tcfg.overwrite:  # read-only: every rank sees the same directory and raises alike
                prepare_fresh_run_dir(self.output_dir)
            barrier(self.dist)  # all ranks have looked before the main one deletes or writes
            if tcfg.overwrite and self.dist.is_main:
                prepare_fresh_run_dir(self.output_dir, overwrite=True)
        else:
            auto = tcfg.resume == "auto"
            source = self._find_checkpoint(self.output_dir if auto else tcfg.resume, missing_ok=auto)
            if source is not None and (source.parent / "config.json").is_file():
                run_config = source.parent / "config.json"
                try:
                    saved = json.loads(run_config.read_text())
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"cannot read the run's config {run_config}: {e}") from None
                changes = check_resume_config(saved, config, tcfg.allow_config_change, run_config)
            barrier(self.dist)  # every rank has read the run's config before the main one rewrites it
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            clean_temp_dirs(self.output_dir)
            if changes:  # accepted with allow_config_change: say so, and keep the record in the run
                print("resuming with a changed config: " + "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in
                                                                      changes.items()), flush=True)
                with open(self.output_dir / "config_changes.jsonl", "a") as f:
                    f.write(json.dumps({"changes": {k: list(v) for k, v in changes.items()}}) + "\n")
            tmp = self.output_dir / f"config.json.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(config, indent=2))
            os.replace(tmp, self.output_dir / "config.json")  # atomic: a reader never sees half a file
        barrier(self.dist)
        if source is not None:
            self.resume(source)
        if self.step >= tcfg.steps:
            return {}

        bar = None
        if self.dist.is_main and tcfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=tcfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
        metrics_path = self.output_dir / "metrics.jsonl"
        if self.dist.is_main:
            self._truncate_metrics(metrics_path, self.step)
        run_losses: dict[int, float] = {}
        window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()
        window_extra: dict = {}
        batches = self._batches()
        try:
            while self.step < tcfg.steps:
                epoch, index, indices, batch = next(batches)
                lr = self.lr_at(self.step)
                for opt in (self.optimizer, self.method_optimizer):
                    for g in (opt.param_groups if opt is not None else ()):
                        g["lr"] = lr
                self.method.global_step = self.step
                with self._autocast():
                    out = self.method.step(batch)
                if "loss" not in out:
                    raise KeyError(f"{type(self.method).__name__}.step() must return a dict with a 'loss' entry")
                loss = out["loss"]
                global_loss = all_reduce_mean(loss.detach().float(), self.dist)
                if not bool(torch.isfinite(global_loss)):
                    self._fail_nonfinite(global_loss, epoch, index, indices, batch)
                if not self.method.backward_in_step:
                    loss.backward()
                grad_norm = None
                if self.ocfg.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.ocfg.grad_clip)
                    grad_norm = float(full_tensor(grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.method_optimizer is not None:
                    self._step_method_modules()
                self.ema.update(self.model)
                self.step += 1
                self.epoch, self.batch_in_epoch = epoch, index + 1
                value = float(global_loss)
                self.losses[self.step] = value
                run_losses[self.step] = value
                window_loss += value
                window_n += 1
                for k, v in out.items():
                    if k != "loss" and torch.is_tensor(v) and v.numel() == 1:
                        total, n = window_extra.get(k, (0.0, 0))
                        window_extra[k] = (total + float(v), n + 1)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
                if self.step % tcfg.log_every == 0 or self.step == tcfg.steps:
                    dt = time.perf_counter() - window_t0
                    record = {
                        "step": self.step, "loss": window_loss / window_n, "lr": lr, "grad_norm": grad_norm,
                        "epoch": epoch, "steps_per_sec": window_n / dt if dt > 0 else None,
                        "samples_per_sec": window_n * _batch_len(batch) * self.dist.world_size / dt if dt > 0 else None,
                        "time": time.time(),
                    }
                    # each extra metric's mean over the window's steps that reported it (a method may report some
                    # only every few steps: K-DMD's student terms, its watchdogs)
                    record.update({k: total / n for k, (total, n) in window_extra.items()})
                    if self.dist.is_main:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(record) + "\n")
                    window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()
                    window_extra = {}
                if tcfg.sample_every and self.step % tcfg.sample_every == 0:
                    self.save_samples()
                if self.step % tcfg.checkpoint_every == 0 or self.step == tcfg.steps:
                    self.save_checkpoint()
                    if self.dist.is_main:
                        self.plot_losses()
        finally:
            if bar is not None:
                bar.close()
        return run_losses

    def _fail_nonfinite(self, loss, epoch, index, indices, batch):
        where = f"step {self.step + 1} (epoch {epoch}, batch {index} of that epoch"
        if indices is not None:
            shown = indices[:8]
            where += f", dataset indices {shown}{' ...' if len(indices) > 8 else ''}"
        where += ")"
        captions = batch.get("caption", [])[:3] if isinstance(batch, dict) else []
        kept = (
            f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint is not None
            else "no checkpoint had been written yet"
        )
        msg = f"loss is {float(loss)} at {where}; first captions {captions}. Training stopped; {kept}."
        if self.dist.is_main:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step + 1, "error": msg, "time": time.time()}) + "\n")
        raise NonFiniteLossError(msg, step=self.step + 1, epoch=epoch, batch_index=index)

    def _step_method_modules(self):
        if self.dist.world_size > 1:
            for p in self.method_params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.dist.world_size
        if self.ocfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.method_params, self.ocfg.grad_clip)
        self.method_optimizer.step()
        self.method_optimizer.zero_grad(set_to_none=True)

    def method_modules_state(self) -> dict:
        return {f"{name}.{k}": v for name, m in self.method_modules.items() for k, v in m.state_dict().items()}

    # ------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.output_dir / f"{CHECKPOINT_PREFIX}{step:07d}"

    def save_checkpoint(self) -> Path:
        """Write a complete checkpoint for the current step (collective: call on every rank)."""
        model_state = full_model_state(self.model, self.dist)
        ema_state = self.ema.full_state(self.model)
        optim_state = full_optimizer_state(self.model, self.optimizer, self.dist)
        rng = all_gather_objects(rng_state(self.generator), self.dist)
        final = self.checkpoint_dir(self.step)
        if self.dist.is_main:
            state = {
                "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "ema_updates": self.ema.num_updates, "world_size": self.dist.world_size, "seed": self.tcfg.seed,
                "model_class": self.model_cls.__name__, "last_loss": self.losses.get(self.step),
                "config": config_to_dict(self.config), "time": time.time(),
            }
            if hasattr(self.method, "state_dict"):
                state["method_state"] = self.method.state_dict()
            write_checkpoint(final, self.model_config, self.model_cls.__name__, model_state, ema_state, optim_state,
                             rng, state, method_modules=self.method_modules_state() or None,
                             method_optimizer=None if self.method_optimizer is None else self.method_optimizer.state_dict())
            prune_checkpoints(self.output_dir, self.tcfg.keep_checkpoints, keep=final)
        barrier(self.dist)
        self.last_checkpoint = final
        return final

    @staticmethod
    def _find_checkpoint(path, missing_ok: bool = False) -> Optional[Path]:
        """A checkpoint (or a run dir's latest), its files checked; None if missing_ok and there is none."""
        p = Path(path)
        if missing_ok and not (p / "latest").is_file() and not (p / "trainer_state.json").is_file():
            return None
        ckpt = resolve_checkpoint(p)
        check_checkpoint_files(ckpt)
        return ckpt

    def resume(self, path, missing_ok: bool = False) -> bool:
        """Restore everything from a checkpoint (or a run dir's latest). Returns False if missing_ok and none."""
        ckpt = self._find_checkpoint(path, missing_ok)
        if ckpt is None:
            return False
        state, rng_meta = read_training_state(ckpt)
        saved_cfg = json.loads((ckpt / "transformer" / "config.json").read_text())
        mine = json.loads(json.dumps(self.model_config, default=list))
        diff = sorted(k for k in set(saved_cfg) | set(mine) if not k.startswith("_") and saved_cfg.get(k) != mine.get(k))
        if diff:
            raise CheckpointError(
                f"checkpoint {ckpt} holds a model with a different config ({diff}); resume with the same model config"
            )
        if state.get("world_size") != self.dist.world_size:
            raise CheckpointError(
                f"checkpoint {ckpt} was written by {state.get('world_size')} process(es) and this run has "
                f"{self.dist.world_size}; exact resume needs the same number"
            )

        load_full_model_state(self.model, read_safetensors(ckpt / "transformer" / MODEL_WEIGHTS), self.dist)
        self.ema.load_full_state(read_safetensors(ckpt / "ema" / MODEL_WEIGHTS))
        self.ema.num_updates = int(state["ema_updates"])
        load_full_optimizer_state(self.model, self.optimizer, load_optimizer_state(ckpt), self.dist)
        restore_rng_state(ckpt, self.dist.rank, rng_meta, self.generator)
        if self.method_modules:
            if not (ckpt / METHOD_MODULES_FILE).is_file():
                raise CheckpointError(f"checkpoint {ckpt} has no {METHOD_MODULES_FILE} for this method's modules "
                                      f"({', '.join(self.method_modules)}); it was written by another method")
            saved = read_safetensors(ckpt / METHOD_MODULES_FILE)
            for name, m in self.method_modules.items():
                prefix = f"{name}."
                m.load_state_dict({k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)})
            if self.method_optimizer is not None:
                self.method_optimizer.load_state_dict(load_optimizer_state(ckpt, METHOD_OPTIMIZER_FILE))
        self.step = int(state["step"])
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        if hasattr(self.method, "load_state_dict") and "method_state" in state:
            self.method.load_state_dict(state["method_state"])
        self.last_checkpoint = ckpt
        if self.dist.is_main:
            print(f"resumed from {ckpt} at step {self.step}", flush=True)
        return True

    @staticmethod
    def _truncate_metrics(path: Path, step: int):
        """Drop log lines past `step` (written by a run that was killed after its last checkpoint)."""
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        path.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------------------------------------
    # Samples and plots
    # ------------------------------------------------------------------------------------------------
    def ema_model(self) -> Optional[nn.Module]:
        """A standalone copy of the model with EMA weights (on rank 0; None elsewhere). Collective under FSDP."""
        state = self.ema.full_state(self.model)
        if not self.dist.is_main:
            return None
        if self._sample_model is None:
            if getattr(self.model, "_hf_peft_config_loaded", False):  # LoRA adapters (K-DMD): the same structure
                import copy

                self._sample_model = copy.deepcopy(self.model).to(self.dist.device)
            else:
                self._sample_model = self.model_cls.from_config(self.model_config).to(self.dist.device)
        self._sample_model.load_state_dict(state)
        return self._sample_model.eval()

    def save_samples(self) -> Optional[Path]:
        """Sample grid of `train.sample_prompts` from the EMA model -> output_dir/samples/step-XXXXXXX.png.

        A method with its own `save_samples(model, path)` (e.g. a reconstruction for autoencoder training)
        is given the EMA model and the path instead.
        """
        hook = getattr(self.method, "save_samples", None)
        if hook is None and (not hasattr(self.method, "text_conditioner") or not hasattr(self.method, "autoencoder")):
            return None
        model = self.ema_model()
        if model is None:
            return None
        out = self.output_dir / "samples" / f"step-{self.step:07d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        if hook is not None:
            return hook(model, out)
        from .pipeline import PocketDiTPipeline, make_grid, make_scheduler

        pipe = PocketDiTPipeline(model, make_scheduler(self.config.schedule.shift), self.method.text_conditioner,
                                 self.method.autoencoder)
        pipe.set_progress_bar_config(disable=True)
        res = self.config.data.resolution
        images = pipe(
            list(self.tcfg.sample_prompts), num_inference_steps=self.tcfg.sample_steps,
            guidance_scale=self.tcfg.sample_guidance, height=res, width=res, seed=self.tcfg.seed,
        ).images
        make_grid(images, scale=max(1, 128 // res)).save(out)
        return out

    def plot_losses(self) -> Optional[Path]:
        return plot_metrics(self.output_dir / "metrics.jsonl", self.output_dir / "loss.png")


_warned_no_matplotlib = False


def plot_metrics(metrics_path: Path, out_path: Path, title: str = "training loss") -> Optional[Path]:
    """Loss curve (per-log-window mean, plus a smoothed line) from a metrics.jsonl file."""
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        return None
    steps, losses = [], []
    for line in metrics_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
    if not steps:
        return None
    try:
        import matplotlib
    except ImportError:
        global _warned_no_matplotlib
        if not _warned_no_matplotlib:
            print("note: matplotlib is not installed, so no loss.png (pip install matplotlib)", flush=True)
            _warned_no_matplotlib = True
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.6, alpha=0.45, label="loss (log window mean)")
    smooth, s = [], 0.0
    for i, v in enumerate(losses, start=1):  # bias-corrected EMA, so the line does not lag from the first value
        s = 0.9 * s + 0.1 * v
        smooth.append(s / (1 - 0.9**i))
    ax.plot(steps, smooth, lw=1.6, label="smoothed")
    if min(losses) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("velocity MSE")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)


# ----------------------------------------------------------------------------------------------------
# From a config
# ----------------------------------------------------------------------------------------------------
def build_components(cfg: TrainConfig):
    """(model, text_conditioner, autoencoder) from a config; the model's text widths and channels follow them."""
    from .autoencoder import load_autoencoder
    from .model import PocketDiT
    from .text import build_text_conditioner

    text = build_text_conditioner(
        cfg.text.encoders, dropout_probs=cfg.text.dropout, max_lengths=cfg.text.max_length
    )
    ae = load_autoencoder(cfg.autoencoder)
    if cfg.model.pretrained:
        model = load_pretrained_transformer(cfg.model.pretrained)
        if cfg.model.overrides:
            model, new = grow_model(model, dict(cfg.model.overrides), source=cfg.model.pretrained)
            if new:
                print(f"model: {cfg.model.pretrained} grown by new modules {', '.join(new)} (the rest of it loaded)")
    else:
        overrides = dict(cfg.model.overrides)
        overrides.setdefault("text_embed_dims", tuple(text.embed_dims))
        overrides.setdefault("in_channels", ae.latent_channels)
        model = PocketDiT.from_preset(cfg.model.preset, **overrides)
    if tuple(model.config.text_embed_dims) != tuple(text.embed_dims):
        raise ValueError(
            f"model.text_embed_dims={tuple(model.config.text_embed_dims)} does not match the text encoders' widths "
            f"{tuple(text.embed_dims)} (text.encoders={cfg.text.encoders})"
        )
    if model.config.in_channels != ae.latent_channels:
        raise ValueError(
            f"model.in_channels={model.config.in_channels} does not match autoencoder {cfg.autoencoder!r} with "
            f"{ae.latent_channels} latent channels"
        )
    latent = cfg.data.resolution // ae.downsample_factor
    if cfg.data.resolution % ae.downsample_factor:
        raise ValueError(f"data.resolution={cfg.data.resolution} is not a multiple of the autoencoder factor {ae.downsample_factor}")
    try:
        model.check_latent_size(latent, latent)
    except ValueError as e:
        raise ValueError(f"data.resolution={cfg.data.resolution}: {e}") from e
    return model, text, ae


def build_trainer(cfg: TrainConfig) -> Trainer:
    from .methods import build_method, get_method, method_options

    # Cheap checks first: a typo in the method should not cost loading text encoders.
    get_method(cfg.method.name)
    bad = sorted(set(cfg.method.options) - set(method_options(cfg.method.name)))
    if bad:
        raise ValueError(
            f"unknown option(s) {['method.' + k for k in bad]} for training method {cfg.method.name!r}; valid options: "
            f"{['method.' + k for k in method_options(cfg.method.name)]}"
        )
    try:
        from .data import build_dataset
    except ImportError as e:
        raise ValueError(f"pocketdit.data.build_dataset is not available in this installation ({e})") from e

    # Fresh weights (the model's, a method's projectors) are a function of train.seed, also for several runs
    # in one process; a resume then loads every one of them.
    torch.manual_seed(cfg.train.seed)
    model, text, ae = build_components(cfg)
    data_kwargs = dict(cfg.data.options)
    data_kwargs.setdefault("resolution", cfg.data.resolution)
    try:
        dataset = build_dataset(cfg.data.name, **data_kwargs)
    except TypeError as e:
        raise ValueError(f"bad data options {sorted(cfg.data.options)} for dataset {cfg.data.name!r}: {e}") from e
    options = dict(cfg.method.options)
    schedule_keys = {"shift", "logit_mean", "logit_std"} & set(method_options(cfg.method.name))
    options.update({k: getattr(cfg.schedule, k) for k in sorted(schedule_keys)})
    method = build_method(cfg.method.name, model=model, text_conditioner=text, autoencoder=ae, **options)
    return Trainer(method, dataset, cfg)
