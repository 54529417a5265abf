"""Knowledge distillation from a teacher (SnapGen++ stage 2, spec sections 5.3 and 9.3).

    x_t, t, target   as in pretraining; the teacher sees the same x_t and t (and the same caption, or its own
                     null condition where caption dropout dropped the student's)
    task     L_task = || v_s - (noise - x0) ||^2
    output   L_out  = || v_s - v_teacher ||^2
    feature  L_feat = || LN(f_teacher) - P_w(f_s) ||^2 on the teacher's token grid, P_w one Linear projector per
             width (student tokens resampled to the teacher's grid when the two differ); optionally masked to
             teacher entries within mean +- 2 std (TinyFusion, against massive activations)

Weighting (`weighting`):
  fixed    L = task_weight L_task + out_weight L_out + feat_weight L_feat
  snapgen  SnapGen's timestep-aware scaling, per sample i:
           L = mean_i [ a(t_i) L_task,i + (1 - a(t_i)) r (out_weight L_out,i + feat_weight L_feat,i) ]
           r = sg(mean L_task / mean L_kd) rescales the KD term to the task loss's magnitude, and
           a(t) = alpha_min + (alpha_max - alpha_min) exp(-logit(t)^2 / (2 alpha_std^2)) leans on the data at mid
           t and on the teacher at the ends. The paper gives only this shape (via a review of SnapGen); the
           profile's constants are ours.

On a supernet (`model elastic_widths`) every step trains the full width and a sampled sub-width, each with its
KD loss, as `method.name: elastic` does (sub-width self-distillation from the full width, running-mean
balance); on a plain model it is one width.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import register_method
from ..elastic import width_key
from .elastic import ElasticPretrain

WEIGHTING = ("fixed", "snapgen")


def snapgen_alpha(t: torch.Tensor, alpha_min: float, alpha_max: float, alpha_std: float) -> torch.Tensor:
    """The data-loss share a(t) of SnapGen's timestep-aware scaling (module docstring)."""
    t = t.float().clamp(1e-4, 1 - 1e-4)
    logit = torch.log(t) - torch.log1p(-t)
    return alpha_min + (alpha_max - alpha_min) * torch.exp(-0.5 * (logit / alpha_std) ** 2)


def timestep_aware_scaling(task: torch.Tensor, kd: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """mean_i [a_i task_i + (1 - a_i) sg(mean task / mean kd) kd_i] for per-sample losses task, kd and shares a."""
    ratio = (task.detach().mean() / kd.detach().mean().clamp_min(1e-12))
    return (alpha * task + (1 - alpha) * ratio * kd).mean()


def per_sample_mse(a: torch.Tensor, b: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    err = (a.float() - b.float()).square().flatten(1)
    if mask is None:
        return err.mean(1)
    m = mask.flatten(1).float()
    return (err * m).sum(1) / m.sum(1).clamp_min(1.0)


def outlier_mask(features: torch.Tensor, num_std: float = 2.0) -> torch.Tensor:
    """True where a teacher feature lies within mean +- num_std std of its sample (TinyFusion's masked KD)."""
    flat = features.float().flatten(1)
    mean, std = flat.mean(1, keepdim=True), flat.std(1, keepdim=True)
    return ((flat - mean).abs() <= num_std * std).view_as(features)


def feature_kd(projector, key: str, features, grid: tuple, teacher_out, feature_norm: bool = True,
               mask_std: float = 0.0, student_norm: bool = False) -> torch.Tensor:
    """Per-sample || P_key(f_student) - LN(f_teacher) ||^2 on the teacher's token grid (optionally masked to the
    teacher entries within mean +- mask_std std): the feature term of KD and of K-DMD. `student_norm` normalises
    the projected student tokens too, so a student whose features are the teacher's own (K-DMD: the few-step
    teacher is the student's starting model plus a LoRA) starts at zero loss with an identity projector."""
    target = teacher_out.features
    if feature_norm:
        target = F.layer_norm(target, target.shape[-1:])
    mask = outlier_mask(target, mask_std) if mask_std > 0 else None
    pred = projector(key, features, grid, teacher_out.feature_grid)
    if student_norm:
        pred = F.layer_norm(pred, pred.shape[-1:])
    return per_sample_mse(pred, target, mask)


class FeatureProjector(nn.Module):
    """One Linear per student width: the student's final-layer tokens (d_w) -> the teacher's feature width.

    init "random" is nn.Linear's; "identity" starts each projector at eye(D, d_w) and zero bias: channel i of the
    student onto channel i of the teacher, which is where a width cut from the teacher's own supernet keeps them."""

    def __init__(self, student_dims: dict, teacher_dim: int, init: str = "random"):
        super().__init__()
        if init not in ("random", "identity"):
            raise ValueError(f"projector init must be 'random' or 'identity', got {init!r}")
        self.proj = nn.ModuleDict({key: nn.Linear(d, teacher_dim) for key, d in student_dims.items()})
        if init == "identity":
            with torch.no_grad():
                for lin in self.proj.values():
                    lin.weight.copy_(torch.eye(*lin.weight.shape))
                    lin.bias.zero_()

    def forward(self, key: str, features: torch.Tensor, student_grid: tuple, teacher_grid: tuple) -> torch.Tensor:
        y = self.proj[key](features)
        if tuple(student_grid) != tuple(teacher_grid):
            b, n, d = y.shape
            y = y.transpose(1, 2).reshape(b, d, *student_grid)
            y = F.interpolate(y, size=tuple(teacher_grid), mode="bilinear", align_corners=False)
            y = y.flatten(2).transpose(1, 2)
        return y


@register_method("kd")
class KnowledgeDistillation(ElasticPretrain):
    """Flow matching plus output and feature KD from a teacher (see the module docstring).

    Args (beyond the elastic method's, which apply on a supernet):
        teacher: a PocketDiT run/checkpoint/pipeline directory, a built-in model name (e.g. "shapes-base"), a
            local diffusers pipeline directory, or a Teacher object.
        teacher_width: the width of a supernet teacher to use (None = its full width).
        teacher_guidance: guidance scale the teacher runs with (1 = its conditional velocity; its own rule).
        teacher_device, teacher_dtype: where and in what dtype the teacher runs ("float16", "bfloat16", ...).
        shared_autoencoder: accept a teacher whose autoencoder differs from the student's (same space saved
            differently); otherwise that is an error.
        weighting: "fixed" or "snapgen"; task_weight, out_weight, feat_weight: the terms' weights.
        alpha_min, alpha_max, alpha_std: the snapgen profile a(t).
        feature_mask_std: mask teacher feature entries beyond this many std (0 = no mask).
        feature_norm: layer-normalise the teacher features before matching (DiT features have a few huge channels).
        teacher_cache: a directory of the teacher's recorded answers for this run's data/noise stream
            (teachers/cache.py): steps found there are read instead of running the teacher, steps not found are run
            and recorded. Without `teacher` the cache alone serves (a missing step is then an error).
    """

    requires_supernet = False

    def __init__(
        self,
        model,
        text_conditioner,
        autoencoder,
        teacher=None,
        teacher_width: Optional[float] = None,
        teacher_guidance: float = 1.0,
        teacher_device: Optional[str] = None,
        teacher_dtype: Optional[str] = None,
        shared_autoencoder: bool = False,
        weighting: str = "fixed",
        task_weight: float = 1.0,
        out_weight: float = 1.0,
        feat_weight: float = 1.0,
        alpha_min: float = 0.25,
        alpha_max: float = 0.75,
        alpha_std: float = 1.0,
        feature_mask_std: float = 0.0,
        feature_norm: bool = True,
        teacher_cache_size: int = 20000,
        teacher_cache: Optional[str] = None,
        **elastic_options,
    ):
        super().__init__(model, text_conditioner, autoencoder, **elastic_options)
        if teacher is None and teacher_cache is None:
            raise ValueError("method.name: kd needs a teacher: --method.teacher PATH (a PocketDiT run, checkpoint or "
                             "pipeline, a built-in model name, or a local diffusers pipeline directory), or a recorded "
                             "--method.teacher_cache DIR")
        if weighting not in WEIGHTING:
            raise ValueError(f"method.weighting={weighting!r} is not one of {WEIGHTING}")
        for name, v in (("task_weight", task_weight), ("out_weight", out_weight), ("feat_weight", feat_weight),
                        ("teacher_guidance", teacher_guidance), ("feature_mask_std", feature_mask_std)):
            if not (math.isfinite(float(v)) and float(v) >= 0):
                raise ValueError(f"method.{name} must be a finite number >= 0, got {v!r}")
        if not (0 <= alpha_min <= alpha_max <= 1) or not alpha_std > 0:
            raise ValueError(f"need 0 <= alpha_min <= alpha_max <= 1 and alpha_std > 0, got {alpha_min}, {alpha_max}, "
                             f"{alpha_std}")
        from ..teachers import check_latent_space, latent_space_signature

        # Loading a teacher may draw from the global RNG (a model built, then its weights loaded); it must not move
        # the draws that follow (the projectors' init), so a run on a teacher cache inits as one with the teacher.
        with torch.random.fork_rng(devices=[]):
            self.teacher = None if teacher is None else self._load_teacher(teacher, teacher_width, teacher_device,
                                                                           teacher_dtype, teacher_cache_size)
        if self.teacher is not None:
            check_latent_space(self.teacher, autoencoder, shared_autoencoder)
        self.teacher_guidance = float(teacher_guidance)
        self.cache = None
        if teacher_cache is not None:
            self.cache = self._open_cache(teacher_cache, teacher, teacher_width, teacher_dtype, feat_weight > 0)
            recorded = self.cache.identity.get("latent_space")
            if not shared_autoencoder and recorded != latent_space_signature(autoencoder):
                from ..teachers import LatentSpaceMismatchError

                raise LatentSpaceMismatchError(
                    f"the teacher cache {teacher_cache} was recorded on the latents of autoencoder {recorded}, the "
                    f"student is trained on {latent_space_signature(autoencoder)} (method.shared_autoencoder: true "
                    "if they are the same autoencoder saved differently)")
            if feat_weight > 0 and self.cache.feature_dim is None:
                raise ValueError(f"the teacher cache {teacher_cache} holds no features; set method.feat_weight 0 or "
                                 "record a cache with feature KD on")
        self.weighting = weighting
        self.task_weight, self.out_weight, self.feat_weight = float(task_weight), float(out_weight), float(feat_weight)
        self.alpha = (float(alpha_min), float(alpha_max), float(alpha_std))
        self.feature_mask_std = float(feature_mask_std)
        self.feature_norm = bool(feature_norm)
        d = model.config.hidden_size
        dims = {width_key(w): int(round(w * d)) for w in (*self.sub_widths, 1.0)}
        feature_dim = self.teacher.feature_dim if self.teacher is not None else self.cache.feature_dim
        self.projector = FeatureProjector(dims, feature_dim) if self.feat_weight > 0 else None

    @staticmethod
    def _load_teacher(spec, width, device, dtype, cache_size):
        from ..teachers import Teacher, load_teacher

        if isinstance(spec, Teacher):
            return spec
        torch_dtype = None if dtype in (None, "float32") else getattr(torch, str(dtype), None)
        if dtype not in (None, "float32") and not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"method.teacher_dtype={dtype!r} is not a torch dtype (float32, float16, bfloat16)")
        teacher = load_teacher(spec, width=width, device=device, dtype=torch_dtype)
        if hasattr(teacher, "cache_size"):
            teacher.cache_size = int(cache_size)
        return teacher

    def _open_cache(self, directory, spec, width, dtype, features: bool):
        """The TeacherCache at `directory`, checked against (or, when new, labelled with) this teacher's setting."""
        from ..teachers import latent_space_signature
        from ..teachers.cache import FORMAT, TeacherCache

        if self.teacher is None:
            return TeacherCache(directory)
        if isinstance(spec, (str, os.PathLike)):
            source = os.path.realpath(spec) if os.path.exists(spec) else os.fspath(spec)
        else:  # a Teacher object
            source = type(spec).__name__
        identity = {
            "format": FORMAT,
            "teacher": source,
            "teacher_kind": type(self.teacher).__name__,
            "teacher_width": width,
            "guidance_scale": self.teacher_guidance,
            "dtype": str(dtype or "float32"),
            "feature_dim": self.teacher.feature_dim if features else None,
            "latent_space": latent_space_signature(self.teacher.autoencoder),
        }
        return TeacherCache(directory, identity)

    def extra_modules(self) -> dict:
        return {"projector": self.projector} if self.projector is not None else {}

    def to(self, device):
        super().to(device)
        if self.teacher is not None and self.teacher.run_device is None:
            self.teacher.to(device)
        return self

    # ------------------------------------------------------------------------------------------------
    def teacher_targets(self, x_t, t, captions, masks):
        """The teacher's velocity and features on (x_t, t): the caption where the student kept it, the teacher's
        own null condition where caption dropout dropped every encoder of the student."""
        ms = masks if isinstance(masks, (list, tuple)) else [masks]
        kept = torch.stack([m.any(dim=1) for m in ms]).any(dim=0).tolist()
        prompts = [c if k else None for c, k in zip(captions, kept)]
        features = self.projector is not None
        if self.cache is not None:
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            out = self.cache.get(self.global_step, rank, x_t, t, prompts, need_features=features)
            if out is not None:
                return out
            if self.teacher is None:
                from ..teachers.cache import TeacherCacheError

                raise TeacherCacheError(
                    f"the teacher cache {self.cache.directory} has no entry for step {self.global_step} (rank {rank}; "
                    f"it holds {len(self.cache)}); give --method.teacher too to compute missing steps, or record "
                    "more with `pocketdit teacher-cache`")
        out = self.teacher(x_t, t, prompts, guidance_scale=self.teacher_guidance, output_features=features)
        if self.cache is not None:
            out = self.cache.put(self.global_step, rank, x_t, t, prompts, out)
        return out

    def kd_losses(self, key, pred, feats, target, t, teacher_out, grid):
        """Per-width combined loss and its logged parts."""
        task = per_sample_mse(pred, target)
        out_kd = per_sample_mse(pred, teacher_out.velocity)
        kd = self.out_weight * out_kd
        parts = {"task": task.mean().detach(), "kd_out": out_kd.mean().detach()}
        if self.projector is not None:
            feat_kd = feature_kd(self.projector, key, feats, grid, teacher_out, self.feature_norm, self.feature_mask_std)
            kd = kd + self.feat_weight * feat_kd
            parts["kd_feat"] = feat_kd.mean().detach()
        if self.weighting == "fixed":
            loss = (self.task_weight * task + kd).mean()
        else:
            alpha = snapgen_alpha(t, *self.alpha)
            loss = timestep_aware_scaling(self.task_weight * task, kd, alpha)
        return loss, parts

    @property
    def output_features(self) -> bool:
        return self.projector is not None

    def step_inputs(self, batch: dict) -> dict:
        inputs = super().step_inputs(batch)
        x_t = inputs["x_t"]
        inputs["teacher"] = self.teacher_targets(x_t, inputs["t"], batch["caption"], inputs["masks"])
        p = self.supernet.config.patch_size
        inputs["grid"] = (x_t.shape[-2] // p, x_t.shape[-1] // p)
        return inputs

    def width_loss(self, width: float, result, inputs: dict) -> tuple:
        return self.kd_losses(width_key(width), result.sample, result.features, inputs["target"], inputs["t"],
                              inputs["teacher"], inputs["grid"])
