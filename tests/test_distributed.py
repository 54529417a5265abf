"""Distributed helpers in one process (the plain case); two-process DDP/FSDP2 runs are in test_trainer.py."""

from __future__ import annotations

import torch
import torch.nn as nn

from pocketdit.distributed import all_gather_objects, all_reduce_mean, full_model_state, setup_distributed, wrap_model


def test_one_process_is_a_pass_through(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = setup_distributed("auto", "cpu")
    assert (info.rank, info.world_size, info.strategy, info.is_main) == (0, 1, "none", True)
    assert setup_distributed("ddp", "cpu").strategy == "none"  # nothing to synchronise with one process
    model = nn.Linear(2, 2)
    assert wrap_model(model, info) is model
    x = torch.ones(3)
    assert all_reduce_mean(x, info) is x
    assert all_gather_objects({"a": 1}, info) == [{"a": 1}]
    assert full_model_state(model, info).keys() == model.state_dict().keys()
