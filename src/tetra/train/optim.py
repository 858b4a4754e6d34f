"""The optimizer (AdamW with decay on matrices only, or GaLore / Conda for the blocks' matrices) and learning-rate
schedules (warmup, then cosine, WSD, linear or constant).

Entry points: build_optimizer(model, config) and lr_at(step, config).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tetra.config import TrainConfig
from tetra.errors import ConfigError
from tetra.parallel.column_linear import ColumnGatheredLinear
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.tensor_parallel import TensorParallelLinear
from tetra.parallel.tensor_parallel_lora import LoRAFactor
from tetra.parallel.zero import ZeroOptimizer
from tetra.train.lowrank_optim import Conda, GaLore

# Modules whose weight is a matrix to decay: plain and tensor-parallel (its shard is flat, but still a matrix), and
# a grid-split LoRA factor or recurrent-depth adapter (each an nn.Linear in one process).
LINEAR_TYPES = (nn.Linear, TensorParallelLinear, LoRAFactor, ColumnGatheredLinear)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only the weight matrices of Linear layers; norms, biases and embeddings are not decayed. A parameter
    marked tetra_lr_scale (LoRA's new token rows) gets a group of its own whose learning rate is scaled."""
    decay, no_decay, seen = [], [], set()
    scaled: dict[float, list] = {}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen or not parameter.requires_grad:
                continue
            seen.add(id(parameter))
            if hasattr(parameter, "tetra_lr_scale"):
                scaled.setdefault(parameter.tetra_lr_scale, []).append(parameter)
                continue
            # tetra_no_decay: tables whose old rows must not move (LoRA's trainable new-token rows)
            is_matrix = (isinstance(module, LINEAR_TYPES) and name == "weight" and parameter is not
                         _tied_embedding(model) and not getattr(parameter, "tetra_no_decay", False))
            (decay if is_matrix else no_decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return groups + [{"params": params, "weight_decay": 0.0, "lr_scale": scale} for scale, params in scaled.items()]


def _tied_embedding(model: nn.Module) -> torch.Tensor | None:
    embed = getattr(model, "embed", None)
    return embed.weight if isinstance(embed, nn.Embedding) else None


def _block_matrix_groups(model: nn.Module, groups: list[dict]) -> list[dict]:
    """The decayed group split in two: the blocks' attention and MLP weights (projected by GaLore / rotated by
    Conda; split or not) and the other matrices (the output head)."""
    block_matrices = {id(module.weight) for name, module in model.named_modules()
                      if name.startswith("blocks.") and isinstance(module, LINEAR_TYPES)}
    decayed, *rest = groups
    projected = [p for p in decayed["params"] if id(p) in block_matrices]
    others = [p for p in decayed["params"] if id(p) not in block_matrices]
    return [{**decayed, "params": projected, "project": True}, {**decayed, "params": others}, *rest]


def build_optimizer(model: nn.Module, config: TrainConfig, grid: ProcessGrid | None = None,
                    zero1: bool = False) -> torch.optim.Optimizer | ZeroOptimizer:
    """AdamW, fused where torch has a fused kernel for the parameters' device; with zero1 on a grid with several
    data ranks, its state is sharded over them. train.optimizer = galore | conda: those for the blocks' matrices,
    on one process, with DDP or on the tensor-splitting grid (grid given: state split like the weights)."""
    groups = parameter_groups(model, config.weight_decay)
    if config.optimizer != "adamw":
        if zero1:
            raise ConfigError(f"train.optimizer = {config.optimizer!r} does not run with parallel.zero1: ZeRO-1's "
                              "flat slices cut the matrices its state is shaped by. Drop parallel.zero1 (the "
                              "grid's depth dimension shards this state like the weights).")
        groups = _block_matrix_groups(model, groups)
        common = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                      update_interval=config.projection_interval, grid=grid)
        if config.optimizer == "galore":
            return GaLore(groups, rank=config.galore_rank, scale=config.galore_scale, **common)
        return Conda(groups, **common)
    fused = next(model.parameters()).device.type in ("cuda", "cpu")

    def adamw(param_groups: list[dict]) -> torch.optim.AdamW:
        return torch.optim.AdamW(param_groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                                 fused=fused)

    if zero1 and grid is not None and grid.size("data") > 1:
        return ZeroOptimizer(groups, grid, adamw)
    return adamw(groups)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then the schedule down to min_lr_ratio."""
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    remaining = max(config.max_steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / remaining, 1.0)
    if config.schedule == "constant":
        return peak
    if config.schedule == "linear":
        return peak + (floor - peak) * progress
    if config.schedule == "wsd":  # warmup-stable-decay: flat, then a linear decay over the last fraction
        decay_start = 1.0 - config.decay_fraction
        if progress < decay_start:
            return peak
        return peak + (floor - peak) * (progress - decay_start) / max(config.decay_fraction, 1e-12)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
