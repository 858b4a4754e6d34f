"""LoRA (Hu et al. 2021): a frozen Linear W plus a trainable low-rank update, y = W x + (alpha / r) B A dropout(x),
with A [r, in] drawn like a Linear's weight and B [out, r] zero, so training starts from the base model exactly.

Applied from outside: apply_lora swaps the chosen nn.Linear modules of a Transformer for LoRALinear in place. A
LoRALinear keeps the base module's own `weight` / `bias` Parameters under the same names, so the state dict still
loads from and saves to every format; the adapter adds `lora_A.weight` and `lora_B.weight` beside them.

Entry points: LoRAConfig, apply_lora(model, config), lora_state(model), merge_lora(model), has_lora(model).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from tetra.config import LoRAConfig
from tetra.errors import ConfigError
from tetra.model.weight_sources import WeightSource

# Short names of the Linears a Transformer has, and the Hugging Face names users also write.
TARGET_ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                  "up_proj": "up", "down_proj": "down", "lm_head": "head"}
ALL_LINEAR = ("q", "k", "v", "o", "gate", "up", "down")
__all__ = ["LoRAConfig", "LoRALinear", "apply_lora", "has_lora", "lora_modules", "lora_state", "merge_lora"]


class LoRALinear(nn.Linear):
    """A frozen Linear with a trainable low-rank update beside it."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float,
                 generator: torch.Generator | None = None) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameters: nothing is copied
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device="meta", dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        if device.type != "meta":  # A is drawn on the CPU (the generator's device), then moved
            self.lora_A.weight = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype))
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            self.lora_A.to(device)
            nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)  # a bf16-stored frozen weight (store_frozen_weights_in) outside autocast
        return F.linear(x, weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + scale * B A, in the base weight's dtype."""
        update = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (self.weight.float() + self.scale * update).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def resolve_targets(targets: list[str]) -> set[str]:
    """Short Linear names from what a user wrote (tetra names, Hugging Face names, or all-linear)."""
    names: set[str] = set()
    for target in targets:
        if target == "all-linear":
            names.update(ALL_LINEAR)
        else:
            names.add(TARGET_ALIASES.get(target, target))
    return names


def linear_names(model: nn.Module) -> list[str]:
    """Every nn.Linear in the model, by qualified name (what targets can match)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
            and not name.endswith(("lora_A", "lora_B"))]


def apply_lora(model: nn.Module, config: LoRAConfig, base: str | None = None, seed: int = 0) -> list[str]:
    """Freeze every parameter, then give each targeted Linear an adapter; returns the adapted modules' names.
    A target matches a Linear whose last name part equals it (q, up, ...) or whose full name equals it. Each A is
    drawn from a generator seeded by (seed, module name), so every process of a run, and every run with the same
    seed, starts from the same adapters whatever else used the global generator. The model keeps the config and
    its base's location (model.lora_config, model.lora_base) for saving."""
    wanted = resolve_targets(config.targets)
    chosen = [name for name in linear_names(model) if name.rsplit(".", 1)[-1] in wanted or name in wanted]
    if "head" in chosen and getattr(getattr(model, "config", None), "tie_embeddings", False):
        raise ConfigError("lora.targets includes the output head, but this model ties it to the token embedding; "
                          "an adapter there would untie them. Leave 'head' out (all-linear already does).")
    if not chosen:
        names = sorted({name.rsplit(".", 1)[-1] for name in linear_names(model)})
        raise ConfigError(f"lora.targets = {config.targets} matches no layer of this model. Its Linear layers are "
                          f"named {', '.join(names)} (Hugging Face names such as q_proj also work, and "
                          "'all-linear' takes every attention and MLP projection).")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in chosen:
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        generator = torch.Generator().manual_seed(_module_seed(seed, name))
        setattr(owner, attribute, LoRALinear(getattr(owner, attribute), config.rank, config.alpha, config.dropout,
                                             generator))
    model.lora_config, model.lora_base = config, base
    return chosen


class LoRAWeights:
    """A weight source for a model with adapters applied on the meta device: base weights from `base`, each A drawn
    exactly as LoRALinear draws it (kaiming-uniform from the generator of (seed, module name), the whole [rank, in]
    matrix: adapters are small), each B zero; any region of them alone."""

    def __init__(self, base: WeightSource, model: nn.Module, seed: int) -> None:
        self.base, self.seed = base, seed
        self.shapes = {**base.shapes, **{name: tuple(parameter.shape) for name, parameter in model.named_parameters()
                                         if ".lora_A." in name or ".lora_B." in name}}

    def read(self, name: str, region: tuple[tuple[int, int], ...]) -> torch.Tensor:
        where = tuple(slice(start, stop) for start, stop in region)
        if name.endswith(".lora_B.weight"):
            return torch.zeros(self.shapes[name])[where]
        if name.endswith(".lora_A.weight"):
            values = torch.empty(self.shapes[name])
            generator = torch.Generator().manual_seed(_module_seed(self.seed, name.removesuffix(".lora_A.weight")))
            nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
            return values[where]
        return self.base.read(name, region)


def train_added_token_rows(model: nn.Module, first_new_row: int, lr_scale: float = 1.0) -> list[str]:
    """Make the token embedding (and an untied head) trainable for the rows from first_new_row on only: the
    gradient of the older rows is zeroed, and the tables are kept out of weight decay, so the base's rows stay
    bit-identical; their learning rate is scaled by lr_scale. Returns the trainable extras' module names (saved
    with the adapter)."""
    extras = ["embed"] if model.config.tie_embeddings else ["embed", "head"]
    for name in extras:
        weight = getattr(model, name).weight
        weight.requires_grad_(True)
        weight.tetra_no_decay, weight.tetra_lr_scale = True, lr_scale
        weight.register_hook(lambda grad: torch.cat([torch.zeros_like(grad[:first_new_row]), grad[first_new_row:]]))
    model.lora_extras = extras
    return extras


def store_frozen_weights_in(model: nn.Module, dtype: torch.dtype) -> None:
    """Keep the adapted Linears' frozen base weights in the autocast dtype: autocast would cast them to it on every
    step anyway (the same rounding, so results are bit-identical), and a frozen weight needs no fp32 master copy."""
    for module in lora_modules(model).values():
        module.weight.data = module.weight.data.to(dtype)


def _module_seed(seed: int, name: str) -> int:
    """A stable 63-bit seed from the run seed and a module name (Python's hash() differs between processes)."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _is_adapted(module: nn.Module) -> bool:
    """A LoRALinear, or its grid-split version (parallel.tensor_parallel_lora): both hold lora_A and lora_B."""
    return hasattr(module, "lora_A") and hasattr(module, "lora_B")


def has_lora(model: nn.Module) -> bool:
    return any(_is_adapted(module) for module in model.modules())


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every adapted Linear by qualified name (each has .lora_A.weight, .lora_B.weight, .rank and .scale)."""
    return {name: module for name, module in model.named_modules() if _is_adapted(module)}


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only ({module}.lora_A.weight, {module}.lora_B.weight), detached."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return state


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear modules back (in place); the model then
    computes the same function with no adapter left, ready to save in any format."""
    for name, module in lora_modules(model).items():
        if not isinstance(module, LoRALinear):
            raise TypeError(f"merge_lora needs whole layers, and {name} is split over a grid; merge the saved "
                            "adapter in one process (tetra convert to-hf CHECKPOINT OUT)")
        owner_name, _, attribute = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device="meta")
        with torch.no_grad():
            plain.weight = nn.Parameter(module.merged_weight(), requires_grad=False)
            plain.bias = module.bias
        setattr(owner, attribute, plain)
    return model
