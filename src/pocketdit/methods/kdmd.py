"""K-DMD: few-step generation by knowledge-guided distribution matching distillation (SnapGen++ section 6).

One training iteration (spec 6.5), in PocketDiT units (x_t = (1 - t) x0 + t noise, v = noise - x0):

    backward simulation  draw a step k of the student's schedule sigma_0 = 1 > ... > sigma_{N-1}; run the student
                         from noise for k steps (no gradient) to x_t at t = sigma_k
    critic               x0_hat = x_t - t v_student (no gradient); x_tau = (1 - tau) x0_hat + tau eps;
                         L_critic = || v_critic(x_tau, tau) - (eps - x0_hat) ||^2          (every iteration)
    student              (every `student_update_every` iterations)
                         x0_hat = x_t - t v_student(x_t, t), re-noised to x_tau at a fresh tau;
                         x0_real = the teacher's x0 at (x_tau, tau) with its own guidance rule and scale;
                         x0_fake = the critic's x0 at (x_tau, tau);
                         g = (x0_fake - x0_real) / mean|x0_hat - x0_real|   per sample, fp32, nan_to_num (DMD2);
                         L_dmd = 0.5 || x0_hat - sg(x0_hat - g) ||^2    (its gradient w.r.t. x0_hat is g)
                         + out_weight || v_student - v_fst ||^2 + feat_weight || P(f_student) - LN(f_fst) ||^2
                         with the few-step teacher (fst) on the same x_t and t, 1:1:1 by default (K-DMD).
                         The few-step teacher is a separate few-step model, or (ode_teacher_steps > 0) the real
                         teacher itself solving its guided ODE from x_t to 0: v_fst = (x_t - x0_ode) / t, the target
                         of DMD's regression loss and of consistency distillation, on the student's own x_t.

`--method dmd` is the same class without the few-step-teacher terms (plain DMD, the baseline the paper never ran).

The student is a PocketDiT (a width of a supernet is cut out first) trained through LoRA adapters (peft, via
diffusers' PeftAdapterMixin); the critic is a copy of the student's starting weights with its own LoRA (or all its
weights trainable with critic_lora_rank 0). `fused_student()` merges the adapters into plain weights.

Update ratio: DMD2 updates the critic every iteration and the student in addition every `student_update_every`
iterations (`ratio_mode: dmd2`, the paper's reading); FastGen's `student_update_freq` makes every N-th iteration a
student step *instead of* a critic step (`ratio_mode: fastgen`).

Watchdogs: every `watch_every` iterations a fixed-seed batch is generated with the student's schedule; the mean
and std of its latents and pixels and the fraction of clipped pixels are logged, and a latent mean that drifts
more than `drift_bound` from the teacher's on the same seeds (the darkening DMD users report) stops training
with LatentDriftError.
"""

from __future__ import annotations

import copy
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import flow
from ..elastic import select_width
from .base import register_method
from .kd import FeatureProjector, feature_kd, per_sample_mse
from .pretrain import FlowMatchingPretrain

RATIO_MODES = ("dmd2", "fastgen")
SIMULATION = ("last", "full")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out", "fc1", "fc2")


class LatentDriftError(RuntimeError):
    """The student's generated latents drifted away from the teacher's (mean beyond the bound)."""


def dmd_loss(x0_hat: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> tuple:
    """(loss, g): DMD2's normalised distribution-matching loss; d loss / d x0_hat = g / numel (mean reduction).

    g = (x0_fake - x0_real) / mean_per_sample |x0_hat - x0_real|, computed in fp32 and made finite."""
    x0_hat32, real, fake = x0_hat.float(), x0_real.float(), x0_fake.float()
    with torch.no_grad():
        norm = (x0_hat32 - real).abs().flatten(1).mean(1).clamp_min(1e-6)
        g = (fake - real) / norm.view(-1, *([1] * (x0_hat.ndim - 1)))
        g = torch.nan_to_num(g)
    loss = 0.5 * F.mse_loss(x0_hat32, (x0_hat32 - g).detach())
    return loss, g


def lora_config(rank: int, alpha: float, targets: Sequence[str] = LORA_TARGETS):
    try:
        from peft import LoraConfig
    except ImportError as e:  # pragma: no cover - peft is in the package's extras
        raise ImportError("K-DMD trains LoRA adapters through peft: pip install 'pocketdit[distill]'") from e
    return LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(targets), init_lora_weights=True)


@register_method("kdmd")
class KnowledgeGuidedDMD(FlowMatchingPretrain):
    """K-DMD (plain DMD without a few-step teacher: `method.name: dmd`).

    Args:
        teacher: the real-score teacher: a PocketDiT run/checkpoint/pipeline, a built-in model name, a local
            diffusers pipeline directory or a Teacher. Defaults to the student's own starting model.
        teacher_guidance: the teacher's guidance scale (paper 4), with its own rule.
        teacher_width: a width of a supernet teacher.
        few_step_teacher: a few-step teacher (e.g. a full-width PocketDiT distilled with plain DMD); kdmd needs it
            or ode_teacher_steps, dmd accepts neither. It runs at guidance 1 on the student's x_t.
        ode_teacher_steps: > 0 makes the real teacher the few-step teacher: from the student's x_t it integrates
            its guided ODE (teacher_guidance) to 0 with Euler steps on its own schedule of this many steps (those
            below t), and the output term matches v to (x_t - x0_ode) / t; its features are those of its first
            (conditional) step. Costs about ode_teacher_steps * t guided teacher calls per student update.
        teacher_shift: the teacher's own sampling shift (its ODE target and the watchdog's reference samples);
            default: the student's `shift`. They differ when the student's few-step schedule is not the teacher's
            (docs/kdmd.md: this base samples better at 4 steps with shift 2 than with the paper's 3).
        width: the width of a supernet student to distil (it is cut out as a standalone model first).
        num_steps, shift: the student's schedule: shift(linspace(1, 0, num_steps + 1))[:-1] (paper 4 steps, shift 3:
            1.0, 0.9, 0.75, 0.5).
        lora_rank, lora_alpha: the student's LoRA (paper 64 / 128); lora_rank 0 trains all weights.
        critic_lora_rank, critic_lora_alpha: the critic's (0 = all its weights trainable).
        student_update_every, ratio_mode: the update ratio (module docstring).
        dmd_weight, out_weight, feat_weight: the K-DMD terms (1:1:1).
        tau_min, tau_max: re-noising times, uniform (DMD2: 0.02-0.98).
        simulation: "last" (no gradient through the simulated steps) or "full" (through every one).
        feature_norm: layer-normalise the few-step teacher's features before matching.
        projector_init, student_norm: the feature projector starts as the identity ("identity") or at random
            ("random"), and the projected student tokens are layer-normalised too (student_norm). The few-step
            teacher is the student's own starting model plus a LoRA, so with both the feature term starts near 0;
            a random projector (KD's default) starts it at the scale of the features and, at weight 1, its
            gradient swamps the DMD term's (docs/kdmd.md: 0.46 against plain DMD's 0.55 at 4 steps).
        watch_every, watch_images, drift_bound: the watchdogs (0 = off).
    """

    backward_in_step = True
    needs_few_step_teacher = True

    def __init__(
        self,
        model,
        text_conditioner,
        autoencoder,
        teacher=None,
        teacher_guidance: float = 4.0,
        teacher_width: Optional[float] = None,
        few_step_teacher=None,
        ode_teacher_steps: int = 0,
        teacher_shift: Optional[float] = None,
        width: Optional[float] = None,
        num_steps: int = 4,
        shift: float = 3.0,
        lora_rank: int = 64,
        lora_alpha: float = 128.0,
        critic_lora_rank: int = 64,
        critic_lora_alpha: float = 128.0,
        student_update_every: int = 5,
        ratio_mode: str = "dmd2",
        dmd_weight: float = 1.0,
        out_weight: float = 1.0,
        feat_weight: float = 1.0,
        tau_min: float = 0.02,
        tau_max: float = 0.98,
        simulation: str = "last",
        feature_norm: bool = True,
        projector_init: str = "identity",
        student_norm: bool = True,
        watch_every: int = 0,
        watch_images: int = 8,
        drift_bound: float = 0.5,
        shared_autoencoder: bool = False,
        caption_dropout=0.0,
        text_cache_size: int = 20000,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ):
        from ..teachers import check_latent_space
        from .kd import KnowledgeDistillation

        if ratio_mode not in RATIO_MODES:
            raise ValueError(f"method.ratio_mode={ratio_mode!r} is not one of {RATIO_MODES}")
        if simulation not in SIMULATION:
            raise ValueError(f"method.simulation={simulation!r} is not one of {SIMULATION}")
        if int(num_steps) < 1 or int(student_update_every) < 1:
            raise ValueError(f"method.num_steps and method.student_update_every must be >= 1, got {num_steps}, "
                             f"{student_update_every}")
        if not 0 < tau_min < tau_max < 1:
            raise ValueError(f"need 0 < tau_min < tau_max < 1, got {tau_min}, {tau_max}")
        for name, v in (("dmd_weight", dmd_weight), ("out_weight", out_weight), ("feat_weight", feat_weight),
                        ("teacher_guidance", teacher_guidance), ("drift_bound", drift_bound)):
            if not (math.isfinite(float(v)) and float(v) >= 0):
                raise ValueError(f"method.{name} must be a finite number >= 0, got {v!r}")
        if isinstance(ode_teacher_steps, bool) or int(ode_teacher_steps) != ode_teacher_steps or ode_teacher_steps < 0:
            raise ValueError(f"method.ode_teacher_steps must be an integer >= 0, got {ode_teacher_steps!r}")
        ode_teacher_steps = int(ode_teacher_steps)
        if teacher_shift is not None and not (math.isfinite(float(teacher_shift)) and float(teacher_shift) > 0):
            raise ValueError(f"method.teacher_shift must be a number > 0, got {teacher_shift!r}")
        if few_step_teacher is not None and ode_teacher_steps:
            raise ValueError("give either method.few_step_teacher or method.ode_teacher_steps, not both")
        if self.needs_few_step_teacher and few_step_teacher is None and not ode_teacher_steps:
            raise ValueError("method.name: kdmd needs a few-step teacher (--method.few_step_teacher PATH, e.g. a model "
                             "distilled with method.name: dmd, or --method.ode_teacher_steps N for the teacher's own "
                             "ODE solution); without one, use method.name: dmd")
        if not self.needs_few_step_teacher and (few_step_teacher is not None or ode_teacher_steps):
            raise ValueError("method.name: dmd has no few-step teacher; use method.name: kdmd for K-DMD")

        base = select_width(model, width)
        base = copy.deepcopy(base) if base is model else base
        base.requires_grad_(False)
        critic = copy.deepcopy(base)
        self._add_lora(base, "student", lora_rank, lora_alpha)
        self._add_lora(critic, "critic", critic_lora_rank, critic_lora_alpha)
        super().__init__(base, text_conditioner, autoencoder, logit_mean=logit_mean, logit_std=logit_std, shift=shift,
                         caption_dropout=caption_dropout, text_cache_size=text_cache_size)
        self.student = base  # unwrapped (the trainer may wrap self.model for data parallelism)
        self.critic = critic
        load = KnowledgeDistillation._load_teacher
        if teacher is None:
            from ..teachers import PocketDiTTeacher

            teacher = PocketDiTTeacher(copy.deepcopy(model), text_conditioner, autoencoder)
        self.teacher = load(teacher, teacher_width, None, None, 20000)
        check_latent_space(self.teacher, autoencoder, shared_autoencoder)
        self.few_step_teacher = None if few_step_teacher is None else load(few_step_teacher, None, None, None, 20000)
        if self.few_step_teacher is not None:
            check_latent_space(self.few_step_teacher, autoencoder, shared_autoencoder)
        self.teacher_guidance = float(teacher_guidance)
        self.ode_teacher_steps = ode_teacher_steps
        self.teacher_shift = float(shift if teacher_shift is None else teacher_shift)
        self.num_steps = int(num_steps)
        self.sigmas = flow.timestep_schedule(self.num_steps, float(shift))  # N + 1 values, 1 ... 0
        self.student_update_every, self.ratio_mode = int(student_update_every), ratio_mode
        self.dmd_weight, self.out_weight, self.feat_weight = float(dmd_weight), float(out_weight), float(feat_weight)
        self.tau = (float(tau_min), float(tau_max))
        self.simulation = simulation
        self.feature_norm = bool(feature_norm)
        self.projector = None
        if self.has_few_step_teacher and self.feat_weight > 0:
            fst = self.few_step_teacher if self.few_step_teacher is not None else self.teacher
            self.projector = FeatureProjector({"1": base.config.hidden_size}, fst.feature_dim, init=projector_init)
        self.student_norm = bool(student_norm)
        self.watch_every, self.watch_images, self.drift_bound = int(watch_every), int(watch_images), float(drift_bound)
        self._reference = None  # the teacher's latent mean on the watchdog seeds
        self._watch_captions: list = []

    @property
    def has_few_step_teacher(self) -> bool:
        return self.few_step_teacher is not None or self.ode_teacher_steps > 0

    @staticmethod
    def _add_lora(model, name: str, rank: int, alpha: float):
        if int(rank) <= 0:
            model.requires_grad_(True)  # all weights trainable
            return
        model.add_adapter(lora_config(rank, alpha), adapter_name=name)

    def state_dict(self) -> dict:
        return {"watch_captions": list(self._watch_captions), "reference": self._reference}

    def load_state_dict(self, state: dict) -> None:
        self._watch_captions = list(state.get("watch_captions", []))
        self._reference = state.get("reference")

    def extra_modules(self) -> dict:
        mods = {"critic": self.critic}
        if self.projector is not None:
            mods["projector"] = self.projector
        return mods

    def to(self, device):
        super().to(device)
        for t in (self.teacher, self.few_step_teacher):
            if t is not None and t.run_device is None:
                t.to(device)
        return self

    # ------------------------------------------------------------------------------------------------
    def _velocity(self, net, x, t, states, masks, features: bool = False):
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        out = net(x, t, states, masks, output_features=features)
        return (out.sample.float(), out.features) if features else out.sample.float()

    def simulate(self, noise, k: int, states, masks, grad: bool = False):
        """The student's sampler from noise for k steps (Euler on its own schedule): x at t = sigmas[k]."""
        x = noise
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            for i in range(k):
                s, s_next = self.sigmas[i].to(x.device), self.sigmas[i + 1].to(x.device)
                x = x + (s_next - s) * self._velocity(self.model if grad else self.student, x, s, states, masks)
        return x

    def _renoise(self, x0, b):
        lo, hi = self.tau
        tau = lo + (hi - lo) * torch.rand(b, generator=self.generator)
        eps = torch.randn(x0.shape, generator=self.generator)
        tau, eps = tau.to(x0.device), eps.to(x0.device, x0.dtype)
        return flow.add_noise(x0, eps, tau), tau, eps

    def _student_turn(self) -> bool:
        return self.global_step % self.student_update_every == 0

    def step(self, batch: dict) -> dict:
        captions = list(batch["caption"])
        b = len(captions)
        if not self._watch_captions:
            self._watch_captions = captions[: self.watch_images]
        states, masks = self.text(captions)
        if len(states) == 1:
            states, masks = states[0], masks[0]
        device = self.device
        shape = (b, self.student.config.in_channels, *self._latent_hw(batch))
        out = {}
        student_turn = self._student_turn()
        critic_turn = self.ratio_mode == "dmd2" or not student_turn

        # Backward simulation: one step index for the whole batch (DMD2's sample_backward), fresh noise.
        k = int(torch.randint(self.num_steps, (1,), generator=self.generator))
        noise = torch.randn(shape, generator=self.generator).to(device)
        x_t = self.simulate(noise, k, states, masks, grad=False)
        t = self.sigmas[k].to(device).expand(b)
        out["sim_step"] = torch.tensor(float(k))

        if critic_turn:
            with torch.no_grad():
                x0_hat = flow.predict_x0(x_t, self._velocity(self.student, x_t, t, states, masks), t)
            x_tau, tau, eps = self._renoise(x0_hat, b)
            critic_loss = F.mse_loss(self._velocity(self.critic, x_tau, tau, states, masks), (eps - x0_hat).float())
            critic_loss.backward()
            out["critic_loss"] = critic_loss.detach()

        if student_turn:
            if self.simulation == "full" and k > 0:
                x_t = self.simulate(noise, k, states, masks, grad=True)
            feats_wanted = self.projector is not None
            res = self._velocity(self.model, x_t, t, states, masks, features=feats_wanted)
            v, f = res if feats_wanted else (res, None)
            x0_hat = flow.predict_x0(x_t, v, t)
            x_tau, tau, _ = self._renoise(x0_hat.detach(), b)
            with torch.no_grad():
                v_real = self.teacher(x_tau, tau, captions, guidance_scale=self.teacher_guidance).velocity
                x0_real = flow.predict_x0(x_tau, v_real, tau)
                x0_fake = flow.predict_x0(x_tau, self._velocity(self.critic, x_tau, tau, states, masks), tau)
            loss_dmd, g = dmd_loss(x0_hat, x0_real, x0_fake)
            loss = self.dmd_weight * loss_dmd
            out["dmd_loss"] = loss_dmd.detach()
            out["dmd_grad_norm"] = g.flatten(1).norm(dim=1).mean()
            if self.has_few_step_teacher:
                if self.few_step_teacher is not None:
                    fst = self.few_step_teacher(x_t.detach(), t, captions, guidance_scale=1.0,
                                                output_features=feats_wanted)
                else:
                    fst = self.teacher_ode(x_t.detach(), t, captions, output_features=feats_wanted)
                loss_out = per_sample_mse(v, fst.velocity).mean()
                loss = loss + self.out_weight * loss_out
                out["kd_out"] = loss_out.detach()
                if feats_wanted:
                    p = self.student.config.patch_size
                    grid = (x_t.shape[-2] // p, x_t.shape[-1] // p)
                    loss_feat = feature_kd(self.projector, "1", f, grid, fst, self.feature_norm,
                                           student_norm=self.student_norm).mean()
                    loss = loss + self.feat_weight * loss_feat
                    out["kd_feat"] = loss_feat.detach()
            loss.backward()
            out["student_loss"] = loss.detach()
        out["loss"] = sum(v for k_, v in out.items() if k_ in ("critic_loss", "student_loss"))
        if self.watch_every and self.global_step % self.watch_every == 0:
            out.update(self.watch(shape[1:]))
        return out

    @torch.no_grad()
    def teacher_ode(self, x_t, t, captions, output_features: bool = False):
        """The real teacher as few-step teacher: its guided ODE from (x_t, t) to 0, as the velocity (x_t - x0) / t.

        Euler steps at t and at the times of its own `ode_teacher_steps`-step schedule below t (so from t = 1 it is
        exactly the teacher's sampler); features, when asked, are those of its first step."""
        from ..teachers import TeacherOutput

        t0 = float(t[0])
        if not torch.all(t == t0) or t0 <= 0:
            raise ValueError("teacher_ode takes one time > 0 for the whole batch (backward simulation draws one step)")
        below = [s for s in flow.timestep_schedule(self.ode_teacher_steps, self.teacher_shift).tolist() if s < t0 - 1e-6]
        times = [t0] + below
        cond = self.teacher.encode_prompts(list(captions))
        x, first = x_t, None
        for i in range(len(times) - 1):
            out = self.teacher(x, torch.full_like(t, times[i]), cond=cond, guidance_scale=self.teacher_guidance,
                               output_features=output_features and i == 0)
            first = out if first is None else first
            x = x + (times[i + 1] - times[i]) * out.velocity
        velocity = (x_t.float() - x.float()) / t0
        return TeacherOutput(velocity, first.features, first.feature_grid)

    def _latent_hw(self, batch):
        if "latents" in batch:
            return tuple(batch["latents"].shape[-2:])
        f = self.autoencoder.downsample_factor
        return batch["image"].shape[-2] // f, batch["image"].shape[-1] // f

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, noise, captions):
        """The student's few-step samples (latents) from `noise` for `captions`, guidance 1: its whole schedule."""
        states, masks = self._encode_cached(list(captions))
        states, masks = [s.to(noise.device) for s in states], [m.to(noise.device) for m in masks]
        if len(states) == 1:
            states, masks = states[0], masks[0]
        return self.simulate(noise, self.num_steps, states, masks)

    @torch.no_grad()
    def watch(self, latent_shape) -> dict:
        """Watchdog statistics on fixed seeds and the first batch's captions; LatentDriftError when the latent
        mean leaves the teacher's (28 guided steps on the same noise and captions, computed once)."""
        n = min(self.watch_images, len(self._watch_captions))
        captions = self._watch_captions[:n]
        noise = torch.randn((n, *latent_shape), generator=torch.Generator().manual_seed(1234)).to(self.device)
        was = self.student.training
        self.student.eval()
        try:
            lat = self.generate(noise, captions)
        finally:
            self.student.train(was)
        pix = self.autoencoder.decode(lat).float()
        if self._reference is None:
            ref = flow.euler_sample(
                lambda x, t, cond: self.teacher(x, t, captions if cond else [None] * n).velocity,
                noise, 28, shift=self.teacher_shift, guidance_scale=self.teacher_guidance,
            )
            self._reference = float(ref.mean())
        mean = float(lat.mean())
        stats = {
            "watch_latent_mean": torch.tensor(mean), "watch_latent_std": lat.std(),
            "watch_pixel_mean": pix.mean(), "watch_pixel_std": pix.std(),
            "watch_clipped": ((pix < -1) | (pix > 1)).float().mean(),
            "watch_teacher_latent_mean": torch.tensor(self._reference),
        }
        drift = abs(mean - self._reference)
        if drift > self.drift_bound:
            raise LatentDriftError(
                f"step {self.global_step}: the student's latent mean {mean:.3f} is {drift:.3f} away from the "
                f"teacher's {self._reference:.3f} on the same seeds and prompts (bound {self.drift_bound}): DMD is "
                "darkening or saturating the samples. Lower the learning rate, raise method.student_update_every or "
                "check the teacher's guidance"
            )
        return stats

    # ------------------------------------------------------------------------------------------------
    def fused_student(self):
        """A plain PocketDiT: the student with its LoRA merged into the weights."""
        student = copy.deepcopy(self.student)
        if getattr(student, "_hf_peft_config_loaded", False):
            student.fuse_lora()
            student.unload_lora()
        return student.requires_grad_(False).eval()


@register_method("dmd")
class DistributionMatchingDistillation(KnowledgeGuidedDMD):
    """Plain DMD: K-DMD without the few-step teacher's output and feature terms."""

    needs_few_step_teacher = False
