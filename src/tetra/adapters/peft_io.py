"""LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors), both ways, so an adapter
trained by tetra loads with `peft.PeftModel.from_pretrained` and one trained with peft loads into tetra.

Entry points: save_peft_adapter(model, folder, config, base), load_peft_adapter(model, folder),
load_model_with_adapter(path, adapter, ...) for any model path that may be (or come with) an adapter folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tetra.adapters.lora import LoRAConfig, apply_lora, lora_modules
from tetra.errors import CheckpointError, ConfigError
from tetra.files import read_json, write_json
from tetra.model import Transformer
from tetra.model.hf_weights import hf_module_name, tetra_module_name
from tetra.model.io import load_model
from tetra.model.safetensors_io import read_tensors, write_tensors
from tetra.model.vocabulary import grow_vocabulary

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model"  # .safetensors
PEFT_PREFIX = "base_model.model."
Cut = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (full tensor, parameter) -> the parameter's piece


def is_adapter_only(path: str | Path) -> bool:
    """A folder with a LoRA adapter but no model weights of its own (a LoRA checkpoint, or a PEFT adapter)."""
    folder = Path(path)
    weights = ("model.safetensors", "model.safetensors.index.json", "config.json", "shards")
    return (folder / ADAPTER_CONFIG).is_file() and not any((folder / name).exists() for name in weights)


def check_peft_names(model: Transformer) -> None:
    """Refuse, before any training, adapters that could not be saved in PEFT's format."""
    try:
        _hf_names(model)
    except CheckpointError:
        raise ConfigError(f"LoRA checkpoints are PEFT adapter folders, and the {model.config.family} layout has no "
                          "one-to-one PEFT module names (GPT-2 fuses q, k and v into one Conv1D). Fine-tune this "
                          "model fully (no [lora]), or use a Llama-, Qwen2-, Mistral- or OPT-style model.") from None


def _hf_names(model: Transformer) -> dict[str, str]:
    """tetra module -> Hugging Face module for every adapted Linear; refuses families PEFT names differently."""
    names = {}
    for module in lora_modules(model):
        hf = hf_module_name(model.config.family, module)
        if hf is None:
            raise CheckpointError(f"The adapted layer {module} has no one-to-one Hugging Face module in the "
                                  f"{model.config.family} layout (GPT-2 fuses q, k and v into one Conv1D), so the "
                                  "adapter cannot be written in PEFT's format. Export the merged model with "
                                  "`tetra convert to-hf` instead.")
        names[module] = hf
    return names


def save_peft_adapter(model: Transformer, folder: Path, config: LoRAConfig, base: str | Path | None,
                      whole: dict[str, torch.Tensor] | None = None) -> None:
    """adapter_config.json + adapter_model.safetensors into an existing folder. `whole`: the trainable tensors by
    parameter name, gathered whole from a grid-split model (whose own parameters are pieces)."""
    names = _hf_names(model)
    parameters = dict(model.named_parameters())

    def value(name: str) -> torch.Tensor:
        return (whole[name] if whole is not None and name in whole else parameters[name]).detach()

    tensors = {}
    for module in lora_modules(model):
        for part in ("lora_A", "lora_B"):
            tensors[f"{PEFT_PREFIX}{names[module]}.{part}.weight"] = value(f"{module}.{part}.weight")
    leaves = {name.rsplit(".", 1)[-1] for name in names.values()}
    every_layer = all(sum(hf.endswith("." + leaf) for hf in names.values()) == model.config.n_layers for leaf in leaves)
    extras = getattr(model, "lora_extras", [])
    tied = model.config.tie_embeddings
    for extra in ["embed", "head"] if extras and tied else extras:  # PEFT writes a tied head's copy too
        source = "embed" if tied else extra
        tensors[f"{PEFT_PREFIX}{hf_module_name(model.config.family, extra)}.weight"] = \
            value(f"{source}.weight").clone()
    write_tensors(tensors, folder, stem=ADAPTER_WEIGHTS)
    write_json(folder / ADAPTER_CONFIG, {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "target_modules": sorted(leaves if every_layer else names.values()),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": [hf_module_name(model.config.family, extra).rsplit(".", 1)[-1] for extra in extras] or None,
        "ensure_weight_tying": bool(extras and tied),
        "base_model_name_or_path": str(Path(base).resolve()) if base else None,
    })


def _adapter_config(folder: Path) -> dict[str, Any]:
    config = read_json(folder / ADAPTER_CONFIG, "PEFT adapter configuration")
    unsupported = [f"{key} = {config.get(key)!r}" for key, ok in (
        ("peft_type", config.get("peft_type") == "LORA"), ("bias", config.get("bias", "none") == "none"),
        ("use_dora", not config.get("use_dora")), ("fan_in_fan_out", not config.get("fan_in_fan_out")),
        ("rank_pattern", not config.get("rank_pattern")), ("alpha_pattern", not config.get("alpha_pattern")),
        ("modules_to_save", set(config.get("modules_to_save") or []) <= {"embed_tokens", "lm_head", "wte"}))
        if not ok]
    if unsupported:
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} uses {', '.join(unsupported)}; tetra loads plain LoRA "
                              "adapters (peft_type LORA, bias none, no DoRA, one rank and alpha for every module).")
    return config


def load_peft_adapter(model: Transformer, folder: str | Path) -> list[str]:
    """Give `model` the adapter of a PEFT folder (its ranks, alpha and weights); returns the adapted modules.
    Tensors that do not fit the model (another base model) are named."""
    folder = Path(folder)
    config = _adapter_config(folder)
    tensors = read_tensors(folder, stem=ADAPTER_WEIGHTS)
    targets, unknown = {}, []
    _load_extras(model, tensors, folder)
    for key in tensors:
        if ".lora_" not in key:
            continue
        hf_module = key.removeprefix(PEFT_PREFIX).rsplit(".lora_", 1)[0]
        module = tetra_module_name(model.config.family, hf_module.removesuffix(".default"))
        (unknown.append(key) if module is None else targets.setdefault(module, hf_module))
    if unknown:
        raise CheckpointError(f"The adapter in {folder} has tensors for modules a {model.config.family} model does "
                              f"not have: {', '.join(unknown[:4])}. It was trained on another base model.")
    if not isinstance(config.get("r"), int) or not isinstance(config.get("lora_alpha"), (int, float)):
        raise CheckpointError(f"{folder / ADAPTER_CONFIG} lacks an integer 'r' or a numeric 'lora_alpha'; it is not "
                              "a complete LoRA adapter configuration.")
    rank = int(config["r"])
    scale_alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):  # rank-stabilized LoRA scales by alpha / sqrt(r): the same as alpha' / r
        scale_alpha = scale_alpha * rank / rank**0.5
    apply_lora(model, LoRAConfig(rank, scale_alpha, float(config.get("lora_dropout", 0.0)), sorted(targets)),
               base=config.get("base_model_name_or_path"))
    _copy_adapter(model, tensors, targets, folder)
    return sorted(targets)


def _load_extras(model: Transformer, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Whole tables the adapter saved beside the low-rank matrices (new token rows): embedding and head."""
    family = model.config.family
    extras = {"embed": tensors.get(f"{PEFT_PREFIX}{hf_module_name(family, 'embed')}.weight"),
              "head": tensors.get(f"{PEFT_PREFIX}{hf_module_name(family, 'head')}.weight")}
    if extras["embed"] is None and extras["head"] is None:
        return
    rows = next(value.shape[0] for value in extras.values() if value is not None)
    shapes = {tuple(value.shape) for value in extras.values() if value is not None}
    if rows < model.config.vocab_size or len(shapes) > 1 or any(v is not None and v.shape[1] != model.config.hidden_size
                                                                for v in extras.values()):
        raise CheckpointError(f"The adapter in {folder} saves token tables of {rows} rows that do not fit this "
                              f"model ({model.config.vocab_size} x {model.config.hidden_size}): another base model.")
    old = model.config.vocab_size
    if grow_vocabulary(model, rows):
        model.added_token_rows = (old, rows)
    with torch.no_grad():
        if extras["embed"] is not None:
            model.embed.weight.copy_(extras["embed"])
        if extras["head"] is not None and not model.config.tie_embeddings:
            model.head.weight.copy_(extras["head"])


def _copy_adapter(model: Transformer, tensors: dict[str, torch.Tensor], targets: dict[str, str],
                  folder: Path, cut: Cut | None = None) -> None:
    """PEFT tensors into the model's adapters (tetra module -> Hugging Face module in `targets`); `cut` gives a
    grid-split adapter its piece of each full tensor."""
    layers = lora_modules(model)
    wrong = []
    with torch.no_grad():
        for module, hf_module in targets.items():
            for part in ("lora_A", "lora_B"):
                value = tensors.get(f"{PEFT_PREFIX}{hf_module}.{part}.weight")
                target: nn.Parameter | None = getattr(layers[module], part).weight if module in layers else None
                shape = None if target is None else _full_shape(target)
                if value is None or target is None or tuple(value.shape) != shape:
                    found = "missing" if value is None else list(value.shape)
                    needs = "no adapter there" if target is None else list(shape)
                    wrong.append(f"{hf_module}.{part} is {found}, the model has {needs}")
                else:
                    target.copy_(value if cut is None else cut(value, target))
    if wrong:
        raise CheckpointError(f"The adapter in {folder} does not fit this model: {'; '.join(wrong[:4])}. It was "
                              "trained on another base model (or with another rank); load it on its own base.")


def _full_shape(parameter: torch.Tensor) -> tuple[int, ...]:
    """The whole tensor's shape, also for a grid-split piece (which records it in its layout)."""
    layout = getattr(parameter, "tetra_layout", None)
    return tuple(layout.full_shape) if layout is not None else tuple(parameter.shape)


def load_adapter_weights_into(model: Transformer, folder: str | Path, cut: Cut | None = None) -> None:
    """Copy a PEFT folder's adapter weights into a model that already has the same adapters (resuming); `cut`
    (full tensor, parameter) -> piece, for a grid-split model."""
    folder = Path(folder)
    tensors = read_tensors(folder, stem=ADAPTER_WEIGHTS)
    _load_extras(model, tensors, folder)
    targets = {module: hf_module_name(model.config.family, module) for module in lora_modules(model)}
    missing = [module for module in targets
               if f"{PEFT_PREFIX}{targets[module]}.lora_A.weight" not in tensors]
    if missing or sum(".lora_" in key for key in tensors) != 2 * len(targets):
        raise CheckpointError(f"The adapter in {folder} does not hold this run's adapters (missing: "
                              f"{', '.join(missing[:4]) or 'none'}; {len(tensors)} tensors for {len(targets)} "
                              "adapted layers). Resume with the [lora] settings the run started with.")
    _copy_adapter(model, tensors, targets, folder, cut)


def load_model_with_adapter(path: str | Path, adapter: str | Path | None = None, dtype: torch.dtype | None = None,
                            device: str | torch.device = "cpu", merge: bool = True) -> Transformer:
    """A model from a checkpoint, Hugging Face folder or GGUF file, with a PEFT adapter applied (and merged) when
    one is given or when `path` is itself an adapter folder (its base from adapter_config.json)."""
    path = Path(path)
    if adapter is None and is_adapter_only(path):
        adapter = path
        base = read_json(path / ADAPTER_CONFIG, "PEFT adapter configuration").get("base_model_name_or_path")
        if not base or not Path(base).exists():
            raise CheckpointError(f"{path} is a LoRA adapter whose base model {base!r} is not on this machine. Pass "
                                  f"the base model and the adapter: MODEL --adapter {path}.")
        path = Path(base)
    model = load_model(path, dtype=torch.float32 if adapter is not None else dtype, device=device)
    if adapter is None:
        return model
    load_peft_adapter(model, adapter)
    if merge:
        from tetra.adapters.lora import merge_lora

        merge_lora(model)
    return model.to(dtype=dtype).eval() if dtype is not None else model.eval()
