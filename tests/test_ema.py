"""EMA: warm-up of the decay, the full state dict it stands in for, loading it back."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pocketdit.checkpoint import CheckpointError
from pocketdit.ema import EMA


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_decay_warms_up_then_holds():
    model = _model()
    ema = EMA(model, decay=0.5)
    start = [s.clone() for s in ema.shadow]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)  # n = 1: decay min(0.5, 2 / 11)
    d = 2 / 11
    for s, s0, p in zip(ema.shadow, start, model.parameters()):
        torch.testing.assert_close(s, d * s0 + (1 - d) * p.detach())
    for _ in range(20):  # (1 + n) / (10 + n) passes 0.5 at n = 8
        ema.update(model)
    before = [s.clone() for s in ema.shadow]
    ema.update(model)
    for s, s0, p in zip(ema.shadow, before, model.parameters()):
        torch.testing.assert_close(s, 0.5 * s0 + 0.5 * p.detach())


def test_full_state_has_buffers_and_loads_back():
    model = _model()
    ema = EMA(model, decay=0.9)
    state = ema.full_state(model)
    assert set(state) == set(model.state_dict())  # BatchNorm buffers come from the model
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    other = EMA(model, decay=0.9)
    other.load_full_state(state)
    for a, b in zip(other.shadow, ema.shadow):
        assert torch.equal(a, b)
    with pytest.raises(CheckpointError, match="no entry"):
        other.load_full_state({})
    bad = dict(state, **{"0.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="shape"):
        other.load_full_state(bad)
