"""Random initial weights that any piece of a tensor can be drawn from alone: a model split over many ranks gets,
on each rank, exactly the values the single-process model has, without any rank drawing the whole tensor.

A tensor (viewed as [rows, everything else]) is cut into TILE x TILE tiles; each tile has its own generator, seeded
by (run seed, parameter name, tile), so a region's values do not depend on who draws them or in what order.

Entry points: init_rules(model, std) -> {name: InitRule}, draw_region(rule, name, shape, region, seed).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

TILE = 256
Region = tuple[tuple[int, int], ...]  # (start, stop) per dimension of the full tensor


@dataclass(frozen=True)
class InitRule:
    """How one parameter starts: 'normal' (mean 0, std), 'ones' or 'zeros'."""

    kind: str
    std: float = 0.0


def init_rules(model: nn.Module, std: float = 0.02) -> dict[str, InitRule]:
    """GPT-2 style rules for every parameter of a single-process model, by its name: Linear weights and embeddings
    normal(std), output projections (o, down) normal(std / sqrt(2 layers)) so the residual stream stays O(1), norm
    weights one, biases zero. Works on a model built on the meta device (only names and types are read)."""
    residual_std = std / math.sqrt(2 * model.config.n_layers)
    rules: dict[str, InitRule] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, nn.Linear):
            is_output = module_name.endswith(".o") or module_name.endswith(".down")
            rules[prefix + "weight"] = InitRule("normal", residual_std if is_output else std)
        elif isinstance(module, nn.Embedding):
            rules[prefix + "weight"] = InitRule("normal", std)
        elif isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.dim() == 1:
            rules[prefix + "weight"] = InitRule("ones")
        if isinstance(getattr(module, "bias", None), nn.Parameter):
            rules[prefix + "bias"] = InitRule("zeros")
    names = {name for name, _ in model.named_parameters()}
    return {name: rule for name, rule in rules.items() if name in names}


def full_region(shape: Sequence[int]) -> Region:
    return tuple((0, size) for size in shape)


def _tile_seed(seed: int, name: str, tile_row: int, tile_col: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{tile_row}/{tile_col}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _normal_region(name: str, shape: Sequence[int], region: Region, seed: int, std: float) -> torch.Tensor:
    """Rows x columns of the tensor seen as 2-D [shape[0], prod(shape[1:])], tile by tile."""
    rows, width = shape[0], math.prod(shape[1:])
    (row_start, row_stop), (col_start, col_stop) = region[0], (region[1] if len(shape) == 2 else (0, width))
    out = torch.empty(row_stop - row_start, col_stop - col_start)
    for tile_row in range(row_start // TILE, -(-row_stop // TILE)):
        top, bottom = tile_row * TILE, min((tile_row + 1) * TILE, rows)
        for tile_col in range(col_start // TILE, -(-col_stop // TILE)):
            left, right = tile_col * TILE, min((tile_col + 1) * TILE, width)
            generator = torch.Generator().manual_seed(_tile_seed(seed, name, tile_row, tile_col))
            tile = torch.randn(bottom - top, right - left, generator=generator)
            r0, r1, c0, c1 = max(top, row_start), min(bottom, row_stop), max(left, col_start), min(right, col_stop)
            out[r0 - row_start:r1 - row_start, c0 - col_start:c1 - col_start] = tile[r0 - top:r1 - top,
                                                                                     c0 - left:c1 - left]
    return out.mul_(std)


def draw_region(rule: InitRule, name: str, shape: Sequence[int], region: Region, seed: int) -> torch.Tensor:
    """The fp32 values of `region` of parameter `name` (full shape `shape`): the same numbers whichever region
    they are drawn as part of. Tensors beyond 2-D are split along their first dimension only."""
    if len(shape) > 2 and any(region[dim] != (0, shape[dim]) for dim in range(1, len(shape))):
        raise ValueError(f"{name}: a region of a {len(shape)}-D tensor may only cut its first dimension.")
    sizes = tuple(stop - start for start, stop in region)
    if rule.kind == "ones":
        return torch.ones(sizes)
    if rule.kind == "zeros":
        return torch.zeros(sizes)
    return _normal_region(name, shape, region, seed, rule.std).view(sizes)
