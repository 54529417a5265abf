"""Distributed set-up: the torchrun process group, rank helpers, DDP / FSDP2 wrapping and full state dicts.

One process (`WORLD_SIZE` unset or 1) is the plain case and every helper here is then a no-op or a
pass-through, so the trainer calls them unconditionally:

    dist_info = setup_distributed("auto", "auto")     # joins torchrun's group when WORLD_SIZE > 1
    wrapped = wrap_model(model, dist_info)            # DDP, FSDP2 (fully_shard per block) or the model itself
    loss = all_reduce_mean(loss, dist_info)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

__all__ = [
    "DistInfo",
    "setup_distributed",
    "wrap_model",
    "all_reduce_mean",
    "all_gather_objects",
    "barrier",
    "full_tensor",
    "full_model_state",
    "full_optimizer_state",
    "load_full_model_state",
    "load_full_optimizer_state",
]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"  # "none", "ddp", "fsdp"
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(strategy: str = "auto", device: str = "auto") -> DistInfo:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1); pick the device."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"train.device={device!r} asks for CUDA but torch.cuda.is_available() is False")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if world == 1:
        strategy = "none"  # nothing to shard or synchronise
    elif strategy == "none":
        raise ValueError(f"train.distributed='none' but {world} processes were launched; use 'ddp' or 'fsdp'")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, strategy=strategy, device=dev)


def wrap_model(model: nn.Module, dist_info: DistInfo) -> nn.Module:
    """DDP, or FSDP2 with one shard group per `model.blocks()` and one for the rest; the model itself otherwise.

    FSDP2 shards `model` in place (its parameters become DTensors), so the returned module is `model`.
    """
    device = dist_info.device
    if dist_info.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # A supernet's step leaves the other widths' private parameters unused (pocketdit.elastic).
        unused = bool(getattr(model, "elastic_widths", None))
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
    if dist_info.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        blocks = model.blocks() if hasattr(model, "blocks") else []
        for blk in blocks:
            fully_shard(blk)
        fully_shard(model)
    return model


def all_reduce_mean(x: torch.Tensor, dist_info: DistInfo) -> torch.Tensor:
    if dist_info.world_size == 1:
        return x
    import torch.distributed as dist

    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / dist_info.world_size


def all_gather_objects(obj, dist_info: DistInfo) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if dist_info.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * dist_info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(dist_info: DistInfo):
    if dist_info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """Gather a sharded DTensor (FSDP2) into a full tensor; plain tensors pass through. Collective for DTensors."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t


# ----------------------------------------------------------------------------------------------------
# Full (unsharded) state dicts: what a checkpoint holds whatever the strategy
# ----------------------------------------------------------------------------------------------------
def full_model_state(model: nn.Module, dist_info: DistInfo) -> dict:
    """The model's full state dict (collective under FSDP2, gathered to CPU)."""
    if dist_info.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, dist_info: DistInfo) -> dict:
    if dist_info.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    return optimizer.state_dict()


def load_full_model_state(model: nn.Module, state: dict, dist_info: DistInfo):
    if dist_info.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, dist_info: DistInfo):
    if dist_info.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
