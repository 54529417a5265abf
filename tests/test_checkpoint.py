"""Checkpoint files: resolving run directories, atomic writes, pruning, RNG state round trips.

End-to-end checkpoints of a training run (layout, corrupt files, crash mid-save, exact resume) are in
test_trainer.py; these tests call pocketdit.checkpoint directly on small hand-made states.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pocketdit.checkpoint import (
    CheckpointError,
    load_checkpoint_weights,
    prune_checkpoints,
    read_training_state,
    resolve_checkpoint,
    restore_rng_state,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from pocketdit.model import PocketDiT


def _write(run, step, model, generator):
    state = model.state_dict()
    return write_checkpoint(run / f"checkpoint-{step:07d}", dict(model.config), "PocketDiT", state, state, {"s": step},
                            [rng_state(generator)], {"step": step})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PocketDiT.from_preset("nano", in_channels=3)


def test_write_resolve_and_load(tmp_path, model):
    g = torch.Generator().manual_seed(3)
    ckpt = _write(tmp_path, 5, model, g)
    assert (tmp_path / "latest").read_text() == "checkpoint-0000005\n"
    assert resolve_checkpoint(tmp_path) == ckpt == resolve_checkpoint(ckpt)
    assert not list(tmp_path.glob("*.tmp-*"))
    loaded = load_checkpoint_weights(tmp_path, ema=False)
    for (n, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    state, rng_meta = read_training_state(ckpt)
    assert state == {"step": 5} and len(rng_meta) == 1
    # re-saving the same step replaces it whole
    _write(tmp_path, 5, model, g)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0000005", "latest"]


def test_prune_keeps_the_newest(tmp_path, model):
    g = torch.Generator()
    for step in (1, 2, 3, 4):
        last = _write(tmp_path, step, model, g)
    prune_checkpoints(tmp_path, keep_last=2, keep=last)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-0000003", "checkpoint-0000004"]


def test_resolve_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("checkpoint-0000009\n")
    with pytest.raises(CheckpointError, match="damaged"):
        resolve_checkpoint(tmp_path)


def test_rng_state_round_trip(tmp_path, model):
    g = torch.Generator().manual_seed(11)
    tensors, meta = rng_state(g)

    def draw():
        return (torch.rand(3).tolist(), torch.rand(3, generator=g).tolist(), np.random.rand(3).tolist(),
                [random.random() for _ in range(3)])

    first = draw()
    set_rng_state(tensors, meta, g)
    assert draw() == first
    # and through the files of a checkpoint
    ckpt = _write(tmp_path, 1, model, g)
    after_save = draw()
    _, rng_meta = read_training_state(ckpt)
    restore_rng_state(ckpt, 0, rng_meta, g)
    assert draw() == after_save


def test_grow_model_adds_modules_and_keeps_every_trained_weight():
    from pocketdit import PocketDiT
    from pocketdit.checkpoint import grow_model

    g = torch.Generator().manual_seed(0)
    base = PocketDiT.from_preset("nano")
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 32, generator=g)

    same, new = grow_model(base, {"hidden_size": 64, "num_heads": 4})  # equal to its config: nothing to grow
    assert same is base and new == []

    grown, new = grow_model(base, {"text_refiner_depth": 1})
    assert new == ["text_refiner"] and grown.config.text_refiner_depth == 1
    with torch.no_grad():
        torch.testing.assert_close(grown(x, t, ctx).sample, base(x, t, ctx).sample, rtol=0, atol=0)

    # A plain model grown into a supernet: the full width is the model, a narrower width starts from its slice.
    sup, new = grow_model(base, {"elastic_widths": [0.5, 1.0]})
    with torch.no_grad():
        torch.testing.assert_close(sup(x, t, ctx).sample, base(x, t, ctx).sample, rtol=0, atol=0)
        half = sup.down_blocks[0].scale_shift_tables["0_5"]
        torch.testing.assert_close(half, base.down_blocks[0].scale_shift_table[:, :32])

    with pytest.raises(ValueError, match="change or drop weights"):
        grow_model(base, {"mlp_ratio_mid": 2.0})
