"""Torch's own data-parallel strategies, as baselines beside the 4D grid: DistributedDataParallel (every rank holds
the whole model) and FSDP2 fully_shard (parameters, gradients and optimizer state sharded over the ranks).

Entry points: wrap_model(model, strategy, device), materialize_fsdp(model, weights, device),
gradient_sync(model, strategy, enabled), full_tensor(value).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tetra.model.weight_sources import WeightSource

STRATEGIES = ("4d", "ddp", "fsdp2")
TORCH_STRATEGIES = ("ddp", "fsdp2")


def wrap_model(model: nn.Module, strategy: str, device: torch.device) -> nn.Module:
    """The module to run forward on. DDP wraps the model; fully_shard changes it in place (each block, then the
    root), keeping every parameter name."""
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
    return model


def materialize_fsdp(model: nn.Module, weights: WeightSource, device: torch.device) -> None:
    """Give a model fully_shard split while it was on the meta device its values: each rank reads only the rows of
    each tensor its shard holds (the same numbers one process has)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    model.to_empty(device=device)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            local = parameter.to_local()
            shape, offset = compute_local_shape_and_global_offset(parameter.shape, parameter.device_mesh,
                                                                  parameter.placements)
            if local.numel():
                region = tuple((start, start + size) for start, size in zip(offset, shape, strict=True))
                local.copy_(weights.read(name, region).reshape(local.shape))


def gradient_sync(model: nn.Module, strategy: str, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient collective in backward for every micro-batch but a step's last (enabled=False)."""
    if strategy == "ddp" and not enabled:
        return model.no_sync()
    if strategy == "fsdp2":
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def is_dtensor(value: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective over its mesh); plain tensors unchanged."""
    return value.full_tensor() if is_dtensor(value) else value


def piece_of(full: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor | None:
    """This rank's DTensor piece of a full tensor saved for a DTensor parameter; None for a plain parameter."""
    from torch.distributed.tensor import distribute_tensor

    if not is_dtensor(parameter) or full.dim() == 0:
        return None
    return distribute_tensor(full.to(parameter.device), parameter.device_mesh, parameter.placements)
