"""Fixtures shared by the quantize tests: a nano PocketDiT with non-trivial weights, synthetic calibration
batches, a palettized copy, and two helpers (its outputs on batches, a mean squared error).

Session-scoped: the palettized copy costs a k-means per layer, and no test changes these in place (they
quantize or fine-tune deep copies)."""

import copy

import pytest
import torch

from pocketdit import quantize as Q
from pocketdit.model import PocketDiT


def nano(seed=0):
    torch.manual_seed(seed)
    model = PocketDiT.from_preset("nano").eval()
    with torch.no_grad():  # zero-initialised layers (final layer, cross-attn out) would make the test trivial
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def model():
    return nano()


@pytest.fixture(scope="session")
def calibration(model):
    return Q.random_calibration(model, num_batches=2, batch_size=2)


@pytest.fixture(scope="session")
def palettized(model, calibration):
    q = copy.deepcopy(model)
    # nearest rounding: the fine-tuning tests need an error to fine-tune away (GPTQ is tested on its own)
    config = Q.PalettizeConfig(nbits=4, high_nbits=8, target_avg_bits=4.3, assignment="nearest")
    report = Q.quantize_(q, config, calibration=calibration, progress=False)
    return q, report


def _outputs(model, batches):
    with torch.no_grad():
        return [model(**b).sample for b in batches]


def _mse(a, b):
    return (a - b).double().pow(2).mean().item()


@pytest.fixture(scope="session")
def outputs():
    """outputs(model, batches): the model's velocity on each calibration batch, without gradients."""
    return _outputs


@pytest.fixture(scope="session")
def F_mse():
    """F_mse(a, b): mean squared error of two tensors, in float64."""
    return _mse
