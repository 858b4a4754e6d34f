"""Loading and saving whole models: tetra checkpoints and Hugging Face folders, with every tensor checked.

Entry points: load_model(path), save_model(model, out), save_hf_model(model, out), read_model_config(path),
load_weights_into(model, folder).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from tetra.errors import CheckpointError, ConfigError
from tetra.files import atomic_directory, is_gguf_file, read_json, write_json
from tetra.model.config import ModelConfig
from tetra.model.gguf_io import read_gguf, read_gguf_config
from tetra.model.hf_config import from_hf_config, to_hf_config
from tetra.model.hf_weights import hf_to_tetra_state, normalize_hf_names, tetra_to_hf_state
from tetra.model.safetensors_io import read_tensors, write_tensors
from tetra.model.sharded_io import has_shards, read_sharded_tensors
from tetra.model.transformer import Transformer

TETRA_CONFIG = "model_config.json"
HF_CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a tetra checkpoint (model_config.json), a Hugging Face folder (config.json) or a GGUF
    file."""
    folder = Path(path)
    if is_gguf_file(folder):
        return read_gguf_config(folder)
    if not folder.exists():
        raise CheckpointError(f"{folder} does not exist. Pass a tetra checkpoint folder or a Hugging Face "
                              "model folder.")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file but not a GGUF model; pass the folder that holds config.json "
                              f"(Hugging Face) or {TETRA_CONFIG} (tetra checkpoint), or a .gguf file.")
    if (folder / TETRA_CONFIG).is_file():
        values = read_json(folder / TETRA_CONFIG, "tetra model configuration")
        return ModelConfig.from_dict(values)
    if (folder / HF_CONFIG).is_file():
        values = read_json(folder / HF_CONFIG, "Hugging Face model configuration")
        if not isinstance(values, dict):
            raise ConfigError(f"{folder / HF_CONFIG} must hold a JSON object.")
        config = from_hf_config(values)
        eos_ids = _with_generation_eos(folder, config.eos_token_ids)
        if eos_ids:
            config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
        return config
    raise CheckpointError(f"{folder} has neither config.json (a Hugging Face model) nor {TETRA_CONFIG} (a tetra "
                          "checkpoint). Point at the folder that holds the model's configuration and weights.")


def _with_generation_eos(folder: Path, eos_ids: list[int]) -> list[int]:
    """Chat models list their end-of-turn tokens in generation_config.json; generation must stop there too."""
    path = folder / "generation_config.json"
    generation = read_json(path, "generation settings") if path.is_file() else {}
    extra = generation.get("eos_token_id") if isinstance(generation, dict) else None
    extra = [extra] if isinstance(extra, int) else extra if isinstance(extra, list) else []
    return sorted(set(eos_ids) | {token for token in extra if isinstance(token, int)})


def check_tensors(expected: dict[str, torch.Size], found: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse missing, unexpected and wrongly shaped tensors, naming each one."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{name} is {list(found[name].shape)} but the config implies {list(shape)}"
             for name, shape in expected.items() if name in found and found[name].shape != shape]
    problems = [f"missing tensors: {_few(missing)}" if missing else "",
                f"unexpected tensors: {_few(unexpected)}" if unexpected else "",
                f"shape mismatches: {_few(wrong)}" if wrong else ""]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"The weights in {source} do not match its model configuration: " + "; ".join(problems)
                              + ". The weights probably belong to a different model: use the config that was saved "
                              "with them.")


def _few(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _empty_model(config: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(config)


def _expected_shapes(model: Transformer) -> dict[str, torch.Size]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("head.weight")
    return {name: value.shape for name, value in state.items()}


def _materialize(model: Transformer, state: dict[str, torch.Tensor]) -> Transformer:
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_embeddings:
        model.head.weight = model.embed.weight
    return model


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Transformer:
    """A ready-to-run Transformer (eval mode) from a tetra checkpoint, a Hugging Face folder or a GGUF file
    (dequantized)."""
    folder = Path(path)
    if is_gguf_file(folder):
        source = read_gguf(folder, dtype or torch.float32)
        return _materialize(_empty_model(source.config), source.tensors).to(device).eval()
    config = read_model_config(folder)
    model = _empty_model(config)
    if (folder / TETRA_CONFIG).is_file():
        state = read_model_tensors(folder)
        check_tensors(_expected_shapes(model), state, folder)
    else:
        expected_hf = {name: value.shape for name, value in
                       tetra_to_hf_state(config.family, model.state_dict(), config.tie_embeddings).items()}
        hf_tensors = normalize_hf_names(config.family, read_tensors(folder), config.tie_embeddings)
        check_tensors(expected_hf, hf_tensors, folder)
        state = hf_to_tetra_state(config.family, hf_tensors)
    model = _materialize(model, state)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


def read_model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Full weights of a tetra checkpoint: model.safetensors, or the shards a parallel run wrote."""
    if not (folder / "model.safetensors").is_file() and has_shards(folder):
        return read_sharded_tensors(folder, "model/")
    if (folder / "adapter_config.json").is_file() and not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{folder} holds a LoRA adapter, not a whole model. tetra's commands load it on its "
                              "base by themselves; in Python use tetra.adapters.peft_io.load_model_with_adapter, or "
                              "peft.PeftModel.from_pretrained(base, folder).")
    return read_tensors(folder)


def load_weights_into(model: Transformer, folder: str | Path) -> None:
    """Copy a tetra checkpoint's weights into an existing model (keeping its Parameters), refusing any mismatch."""
    folder = Path(folder)
    state = read_model_tensors(folder)
    check_tensors(_expected_shapes(model), state, folder)
    with torch.no_grad():
        for name, parameter in model.state_dict(keep_vars=True).items():
            if name in state:
                parameter.copy_(state[name])


def _copy_tokenizer_files(source: Path | None, staging: Path) -> None:
    for name in TOKENIZER_FILES:
        if source is not None and (source / name).is_file():
            shutil.copy2(source / name, staging / name)


def model_tensors_for_saving(model: Transformer) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("head.weight")
    return state


def _saved_config(model: Transformer) -> ModelConfig:
    config = ModelConfig.from_dict(model.config.to_dict())
    config.dtype = str(model.embed.weight.dtype).removeprefix("torch.")
    return config


def write_model_files(model: Transformer, folder: Path, tokenizer_from: str | Path | None = None,
                      state: dict[str, torch.Tensor] | None = None, weights: bool = True) -> None:
    """model_config.json + model.safetensors (+ tokenizer files) into an existing folder. `state` replaces the
    model's own tensors (a parallel model passes its gathered full tensors); weights=False leaves them to shards."""
    config = _saved_config(model)
    if state is not None:
        config.dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    write_json(folder / TETRA_CONFIG, config.to_dict())
    if weights:
        write_tensors(model_tensors_for_saving(model) if state is None else state, folder)
    _copy_tokenizer_files(Path(tokenizer_from) if tokenizer_from else None, folder)


def save_model(model: Transformer, out: str | Path, tokenizer_from: str | Path | None = None,
               overwrite: bool = False) -> Path:
    """Write a tetra checkpoint folder atomically: model_config.json + model.safetensors (+ tokenizer files)."""
    with atomic_directory(out, overwrite) as staging:
        write_model_files(model, staging, tokenizer_from)
    return Path(out)


def save_hf_model(model: Transformer, out: str | Path, tokenizer_from: str | Path | None = None,
                  max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Path:
    """Write a folder that transformers.AutoModelForCausalLM.from_pretrained loads (config.json + safetensors)."""
    config = _saved_config(model)
    tensors = tetra_to_hf_state(config.family, model_tensors_for_saving(model), config.tie_embeddings)
    return write_hf_folder(config, lambda staging: write_tensors(tensors, staging, max_shard_bytes=max_shard_bytes),
                           out, tokenizer_from, overwrite)


def write_hf_folder(config: ModelConfig, write_weights: Callable[[Path], object], out: str | Path,
                    tokenizer_from: str | Path | None, overwrite: bool) -> Path:
    """config.json, the weights (write_weights fills the staging folder), tokenizer files and generation_config.json,
    atomically: what transformers.AutoModelForCausalLM.from_pretrained reads."""
    hf_config = to_hf_config(config)  # refuses what Hugging Face cannot represent, before anything is written
    with atomic_directory(out, overwrite) as staging:
        write_json(staging / HF_CONFIG, hf_config)
        write_weights(staging)
        _copy_tokenizer_files(Path(tokenizer_from) if tokenizer_from else None, staging)
        if not (staging / "generation_config.json").exists():
            write_json(staging / "generation_config.json",
                       {key: hf_config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")})
    return Path(out)
