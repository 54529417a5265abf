"""Elastic supernet training (SnapGen++ section 4.4): every step trains the full width and a sampled sub-width.

    x_t, t, target  as in pretraining (one batch, one noise, one t for every width)
    full:      L_1   = || v_1(x_t, t) - target ||^2
    sub w:     L_w   = || v_w(x_t, t) - target ||^2 + distill_weight * || v_w(x_t, t) - sg(v_1(x_t, t)) ||^2
    step loss: L_1 + mean over the sampled w of  L_w   (each L_w times m_1 / m_w with balance: running_mean)

The per-width terms are summed as they are by default (`balance: none`). `balance: running_mean` rescales each
sub-width's term by m_1 / m_w, m_w a running mean (momentum `balance_momentum`) of width w's loss, detached and
averaged over data-parallel ranks, so that a narrow width with a larger loss cannot dominate the shared weights
(the paper only says "adaptive scaling to ensure balanced updates"). Measured on shapes (docs/elastic.md), that
rule starves a width cut from a trained model: it starts far behind the full width, so its term is scaled down
just when it has most to learn (width 0.5 after 1000 steps: ShapesEval 0.26 with it, 0.35 without, 0.37 for the
same width trained alone); hence the plain sum is the default. The running means are kept and logged either way.

Each width gets its own backward pass (the full width's first, under DDP `no_sync` / FSDP2
`set_requires_gradient_sync(False)`, so gradients are reduced once), as slimmable networks train: only one
width's activations are alive at a time. The sub-width is drawn from (seed, global step), so every rank
draws the same one without communicating.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import register_method
from .pretrain import FlowMatchingPretrain

SAMPLING = ("uniform", "sandwich")
BALANCE = ("running_mean", "none")


def _key(width: float) -> str:
    return f"w{width:g}"


@register_method("elastic")
class ElasticPretrain(FlowMatchingPretrain):
    """Flow matching for a width-elastic PocketDiT (a model built with `elastic_widths`).

    Args (beyond pretraining's):
        distill_weight: weight of the sub-width's regression onto the stop-gradient full-width velocity.
        sampling: "uniform" (one sub-width per step, drawn with `width_probs`, uniform by default) or
            "sandwich" (every sub-width every step).
        width_probs: one probability per sub-width (ascending widths), for "uniform".
        balance: "none" (sum the widths' terms) or "running_mean" (see the module docstring).
        balance_momentum: momentum of the running means.
        seed: seeds the width draw together with the global step.
        logit_mean, logit_std, shift, caption_dropout, text_cache_size: as for pretraining.
    """

    backward_in_step = True
    requires_supernet = True  # a subclass (kd) may also train a plain model, as its one width

    def __init__(
        self,
        model,
        text_conditioner,
        autoencoder,
        distill_weight: float = 0.25,
        sampling: str = "uniform",
        width_probs: Optional[Sequence[float]] = None,
        balance: str = "none",
        balance_momentum: float = 0.99,
        seed: int = 0,
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        shift: float = 3.0,
        caption_dropout=None,
        text_cache_size: int = 0,
    ):
        super().__init__(model, text_conditioner, autoencoder, logit_mean=logit_mean, logit_std=logit_std, shift=shift,
                         caption_dropout=caption_dropout, text_cache_size=text_cache_size)
        widths = getattr(model, "elastic_widths", None) or (1.0,)
        if self.requires_supernet and len(widths) < 2:
            raise ValueError(
                "method.name: elastic needs a supernet with at least two widths: set model elastic_widths, e.g. "
                "--model.elastic_widths '[0.5, 1.0]' (the full width 1.0 included)"
            )
        self.supernet = model  # the trainer may wrap self.model in DDP; widths are set on the model itself
        self.sub_widths = tuple(w for w in widths if w < 1.0)
        if sampling not in SAMPLING:
            raise ValueError(f"method.sampling={sampling!r} is not one of {SAMPLING}")
        if balance not in BALANCE:
            raise ValueError(f"method.balance={balance!r} is not one of {BALANCE}")
        if not (math.isfinite(distill_weight) and distill_weight >= 0):
            raise ValueError(f"method.distill_weight must be a finite number >= 0, got {distill_weight}")
        if not 0 <= balance_momentum < 1:
            raise ValueError(f"method.balance_momentum must be in [0, 1), got {balance_momentum}")
        if width_probs is not None:
            probs = np.asarray(width_probs, dtype=np.float64)
            if probs.shape != (len(self.sub_widths),) or (probs < 0).any() or not probs.sum() > 0:
                raise ValueError(
                    f"method.width_probs needs one probability >= 0 per sub-width {list(self.sub_widths)}, got {width_probs}"
                )
            width_probs = (probs / probs.sum()).tolist()
        self.distill_weight = float(distill_weight)
        self.sampling, self.width_probs = sampling, width_probs
        self.balance, self.balance_momentum = balance, float(balance_momentum)
        self.seed = int(seed)
        self.running: dict[str, float] = {}  # width key -> running mean of its flow-matching loss

    # ------------------------------------------------------------------------------------------------
    def widths_for_step(self, step: int) -> list[float]:
        """The sub-widths trained at `step`: the same on every rank (drawn from (seed, step) only)."""
        if not self.sub_widths:
            return []
        if self.sampling == "sandwich":
            return list(self.sub_widths)
        rng = np.random.default_rng([self.seed, step])
        return [self.sub_widths[int(rng.choice(len(self.sub_widths), p=self.width_probs))]]

    def state_dict(self) -> dict:
        return {"running": dict(self.running)}

    def load_state_dict(self, state: dict) -> None:
        self.running = {k: float(v) for k, v in state.get("running", {}).items()}

    def _update_running(self, key: str, loss: torch.Tensor) -> float:
        value = loss.detach().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= torch.distributed.get_world_size()
        value = float(value)
        old = self.running.get(key)
        self.running[key] = value if old is None else self.balance_momentum * old + (1 - self.balance_momentum) * value
        return self.running[key]

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool):
        """Accumulate this backward locally (DDP no_sync / FSDP2) unless it is the step's last."""
        m = self.model
        if enabled:
            yield
        elif hasattr(m, "no_sync"):
            with m.no_sync():
                yield
        elif hasattr(m, "set_requires_gradient_sync"):
            m.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                m.set_requires_gradient_sync(True)
        else:
            yield

    # Hooks a subclass (kd.py) overrides: what a step computes once, and one width's loss.
    output_features = False  # ask the model for its final-layer tokens too

    def step_inputs(self, batch: dict) -> dict:
        """Everything every width of this step shares: one noisy batch (and, in subclasses, teacher targets)."""
        x_t, t, target, states, masks = self.noisy_batch(batch)
        return {"x_t": x_t, "t": t, "target": target, "states": states, "masks": masks}

    def width_loss(self, width: float, result, inputs: dict) -> tuple:
        """(loss, parts to log) of one width's model output: flow matching here."""
        return F.mse_loss(result.sample.float(), inputs["target"].float()), {}

    def _forward(self, inputs: dict):
        return self.model(inputs["x_t"], inputs["t"], inputs["states"], inputs["masks"],
                          output_features=self.output_features)

    def step(self, batch: dict) -> dict:
        inputs = self.step_inputs(batch)
        subs = self.widths_for_step(self.global_step)
        out = {}

        with self._gradient_sync(not subs):
            if self.sub_widths:
                self.supernet.set_width(1.0)
            result = self._forward(inputs)
            loss_full, parts = self.width_loss(1.0, result, inputs)
            loss_full.backward()
        m_full = self._update_running(_key(1.0), loss_full)
        total = loss_full.detach()
        out[f"loss_{_key(1.0)}"] = loss_full.detach()
        out.update({f"{k}_{_key(1.0)}": v for k, v in parts.items()})
        teacher = result.sample.detach().float()
        del result

        for i, w in enumerate(subs):
            with self._gradient_sync(i == len(subs) - 1):
                self.supernet.set_width(w)
                try:
                    result = self._forward(inputs)
                finally:
                    self.supernet.set_width(1.0)
                loss_w, parts = self.width_loss(w, result, inputs)
                distill = F.mse_loss(result.sample.float(), teacher)
                m_w = self._update_running(_key(w), loss_w)
                scale = m_full / m_w if self.balance == "running_mean" and m_w > 0 else 1.0
                term = (loss_w + self.distill_weight * distill) * (scale / len(subs))
                term.backward()
            total = total + term.detach()
            out[f"loss_{_key(w)}"] = loss_w.detach()
            out[f"distill_{_key(w)}"] = distill.detach()
            out.update({f"{k}_{_key(w)}": v for k, v in parts.items()})
        for k, v in self.running.items():
            out[f"loss_{k}_avg"] = torch.tensor(v)
        out["loss"] = total
        return out
