"""Everything a run needs before its first step: the dataset, a model that fits it, and their consistency checks.

Entry points: build_model_for_run(config, explicit_model, data, device, on_meta) -> (model, tokenizer folder, weight
source), auto_grid,
gemm_layouts_for_run, enable_activation_checkpointing.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from tetra.config import RunConfig, recomputed_part
from tetra.data.arithmetic import digit_token_ids
from tetra.data.gguf_tokenizer import load_tokenizer
from tetra.data.shards import PreparedData
from tetra.data.tokenizer import TextTokenizer
from tetra.errors import ConfigError, DataError
from tetra.files import is_gguf_file
from tetra.model import ModelConfig, Transformer
from tetra.model.initialization import init_rules
from tetra.model.io import load_model, read_model_config
from tetra.model.presets import PRESETS
from tetra.model.vocabulary import grow_vocabulary, reset_rows_to_mean
from tetra.model.weight_sources import RandomWeights, WeightSource, open_weights
from tetra.parallel.gemm_layout import IN_OUT, LayoutCache, Shape, agree_on_layouts, choose_layouts, default_cache_path
from tetra.parallel.grid import ProcessGrid
from tetra.parallel.parallelize import linear_block_shapes


def resolve_model_config(config: RunConfig, explicit_model: dict[str, Any], data: PreparedData) -> ModelConfig:
    """Preset (if any), then the [model] keys given, with vocabulary and special ids from the dataset's tokenizer."""
    values: dict[str, Any] = {}
    if config.init.preset:
        if config.init.preset not in PRESETS:
            raise ConfigError(f"init.preset = {config.init.preset!r} is unknown. Presets: {', '.join(PRESETS)}.")
        values.update(dataclasses.asdict(ModelConfig(**PRESETS[config.init.preset])))
    else:
        values.update(dataclasses.asdict(config.model))
    values.update({key: getattr(config.model, key) for key in explicit_model})
    tokenizer = TextTokenizer.load(data.tokenizer_folder)
    if not explicit_model.get("vocab_size"):
        values["vocab_size"] = data.vocab_size
    values.update(eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id, pad_token_id=tokenizer.pad_id)
    if str(values.get("positions", "")).startswith("abacus"):
        _fill_abacus(values, tokenizer, data)
    return ModelConfig.from_dict(values)


def _fill_abacus(values: dict[str, Any], tokenizer: TextTokenizer, data: PreparedData) -> None:
    """Abacus positions take the digits' token ids from the data's tokenizer, and the longest number from the
    arithmetic data's meta.json, unless [model] sets them."""
    if not values.get("abacus_digit_ids"):
        values["abacus_digit_ids"] = digit_token_ids(tokenizer)
    if not values.get("abacus_max_digits"):
        longest = data.meta.get("arithmetic", {}).get("longest_number")
        if not longest:
            raise ConfigError(f"model.positions = {values['positions']!r} needs model.abacus_max_digits (the longest "
                              f"number the model reads or writes); {data.folder} does not record one. Set it.")
        values["abacus_max_digits"] = int(longest)


# Keys a checkpoint's own config may legitimately differ in from a [model] table (ids come from the tokenizer,
# the dtype is the storage dtype, not the fp32 training dtype).
IGNORED_WHEN_COMPARING = {"eos_token_id", "bos_token_id", "pad_token_id", "dtype", "dropout"}


def _check_explicit_keys_agree(loaded: ModelConfig, explicit_model: dict[str, Any], source: Path) -> None:
    """[model] keys next to init.checkpoint may only restate the checkpoint's shape (as a run's config.toml does)."""
    resolved = dataclasses.asdict(loaded)
    different = [f"model.{key} = {value!r} but the checkpoint has {resolved[key]!r}"
                 for key, value in explicit_model.items() if key not in IGNORED_WHEN_COMPARING
                 and key in resolved and value != resolved[key] and not (key == "vocab_size" and value == 0)]
    if different:
        raise ConfigError(f"[model] disagrees with init.checkpoint = {source}: " + "; ".join(different)
                          + ". Remove these keys: a checkpoint's shape cannot change.")


def check_model_fits_data(model_config: ModelConfig, config: RunConfig, data: PreparedData,
                          tokenizer_folder: Path | None) -> None:
    """The tokenizer must match the prepared data, and the sequences must fit the model."""
    problems = []
    if model_config.vocab_size < data.vocab_size:
        problems.append(f"the model's vocabulary ({model_config.vocab_size}) is smaller than the tokenizer's "
                        f"({data.vocab_size}) used to prepare {data.folder}")
    if tokenizer_folder is not None and ((tokenizer_folder / "tokenizer.json").is_file()
                                         or is_gguf_file(tokenizer_folder)):
        fingerprint = load_tokenizer(tokenizer_folder).fingerprint()
        if fingerprint != data.meta["tokenizer_fingerprint"]:
            problems.append(f"the tokenizer in {tokenizer_folder} is not the one {data.folder} was prepared with; "
                            "prepare the data again with `--tokenizer` pointing at the model's tokenizer")
    if config.data.seq_len > model_config.max_position_embeddings:
        problems.append(f"data.seq_len = {config.data.seq_len} is above the model's maximum of "
                        f"{model_config.max_position_embeddings} positions; lower data.seq_len")
    if problems:
        raise DataError("The model and the data do not fit together:\n  - " + "\n  - ".join(problems))


def build_model_for_run(config: RunConfig, explicit_model: dict[str, Any], data: PreparedData,
                        device: torch.device, on_meta: bool = False
                        ) -> tuple[Transformer, Path, WeightSource | None]:
    """An fp32 model on `device` (random from a preset/config, or loaded from init.checkpoint) that fits the data,
    and its tokenizer folder. on_meta: the model is built on the meta device, with no storage, and returned with the
    WeightSource its values come from (parallel.materialize gives each rank only its pieces once the grid has split
    it); a model whose vocabulary the data grows is still built whole (the source is then None)."""
    if config.init.checkpoint:
        return _model_from_checkpoint(config, explicit_model, data, device, on_meta)
    model_config = resolve_model_config(config, explicit_model, data)
    check_model_fits_data(model_config, config, data, None)
    if on_meta:
        with torch.device("meta"):
            model = Transformer(model_config)
        shapes = {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}
        weights = RandomWeights(init_rules(model, config.init.std), shapes, config.train.seed)
        return model.train(), data.tokenizer_folder, weights
    torch.manual_seed(config.train.seed)
    model = Transformer(model_config)
    model.init_weights(config.init.std, seed=config.train.seed)  # the values a meta-built grid model draws
    return model.to(device).train(), data.tokenizer_folder, None


def _model_from_checkpoint(config: RunConfig, explicit_model: dict[str, Any], data: PreparedData,
                           device: torch.device, on_meta: bool) -> tuple[Transformer, Path, WeightSource | None]:
    source = Path(config.init.checkpoint)
    own_tokenizer = source if (source / "tokenizer.json").is_file() or is_gguf_file(source) else None
    if _data_extends_tokenizer(data, own_tokenizer):
        # The data added tokens (refusal tokens) to this model's tokenizer: grow the vocabulary to match (a table
        # with unused rows past its tokenizer needs no growth) and start the added rows at the mean.
        model = load_model(source, dtype=torch.float32, device=device)
        _check_explicit_keys_agree(model.config, explicit_model, source)
        first = int(data.meta["base_vocab_size"])
        grow_vocabulary(model, data.vocab_size)
        reset_rows_to_mean(model, first, data.vocab_size)
        model.added_token_rows = (first, data.vocab_size)
        check_model_fits_data(model.config, config, data, None)
        return model.train(), data.tokenizer_folder, None
    weights = None
    if on_meta:
        model_config = read_model_config(source)
        if is_gguf_file(source):
            model_config.dtype = "float32"  # what load_model records for a dequantized GGUF model
        with torch.device("meta"):
            model = Transformer(model_config)
        weights = open_weights(source, model)
    else:
        model = load_model(source, dtype=torch.float32, device=device)
    _check_explicit_keys_agree(model.config, explicit_model, source)
    check_model_fits_data(model.config, config, data, own_tokenizer)
    return model.train(), own_tokenizer or data.tokenizer_folder, weights


def _data_extends_tokenizer(data: PreparedData, tokenizer_folder: Path | None) -> bool:
    """Whether the data's tokenizer is the model's plus added tokens (prepare records the base's fingerprint)."""
    base = data.meta.get("base_tokenizer_fingerprint")
    if base is None or data.vocab_size <= data.meta.get("base_vocab_size", data.vocab_size):
        return False
    return tokenizer_folder is None or load_tokenizer(tokenizer_folder).fingerprint() == base


def auto_grid(config: RunConfig, model_config: ModelConfig, world: int) -> tuple[RunConfig, str]:
    """The config with the planner's best grid for `world` ranks and the machine profile, keeping the global batch
    (train.batch_size x world sequences per micro-step) the same; and a line saying what was chosen."""
    from tetra.parallel.planner import MachineProfile, plan

    machine = MachineProfile.load(config.parallel.machine)
    global_batch = config.train.batch_size * world
    best = plan(model_config, world, global_batch, config.data.seq_len, machine, config.parallel.zero1,
                micro_batch=1, overlap=config.parallel.overlap, regather=config.parallel.regather,
                recompute=recomputed_part(config.train.activation_checkpointing),
                finetune="lora" if config.lora.enabled else "full")[0]
    shape = best.shape
    batch_size = global_batch // (shape.data * shape.depth)
    parallel = dataclasses.replace(config.parallel, data=shape.data, depth=shape.depth, row=shape.row, col=shape.col)
    train = dataclasses.replace(config.train, batch_size=batch_size)
    summary = (f"parallel.auto on {world} x {machine.name}: data {shape.data} x depth {shape.depth} x row {shape.row} "
               f"x col {shape.col}, {batch_size} sequences per batch rank; predicted {best.step_time * 1000:.1f} ms "
               f"per micro-step, {sum(best.memory.values()) / 1e9:.2f} GB per device")
    return dataclasses.replace(config, parallel=parallel, train=train), summary


def gemm_layouts_for_run(config: RunConfig, model: Transformer, grid: ProcessGrid, device: torch.device,
                         dtype: torch.dtype, main_rank: bool) -> tuple[dict[Shape, str], str]:
    """The storage layout of each split Linear's block (parallel.gemm_layout), and a line saying what was chosen.
    auto: rank 0 times each block shape once on this device at this run's tokens per micro-batch (or finds it in
    the cache) and every rank takes its answer. Collective when auto."""
    shapes = linear_block_shapes(model, grid)
    if config.parallel.gemm_layout != "auto":
        return dict.fromkeys(shapes, config.parallel.gemm_layout), f"GEMM layouts: all {config.parallel.gemm_layout}"
    choices, summary = {}, ""
    if main_rank:
        tokens = config.train.batch_size * config.data.seq_len
        timed = choose_layouts(shapes, tokens, dtype, device, LayoutCache.load(default_cache_path()))
        choices = {shape: choice.layout for shape, choice in timed.items()}
        faster = [f"{out}x{in_} {choice.speedup:.2f}x" for (out, in_), choice in timed.items()
                  if choice.layout == IN_OUT]
        fresh = sum(not choice.cached for choice in timed.values())
        summary = (f"GEMM layouts ({len(timed)} weight shapes, {tokens} tokens, {str(dtype).removeprefix('torch.')}; "
                   f"{fresh} timed now, {len(timed) - fresh} from the cache {default_cache_path()}): "
                   + (f"[in, out] for {', '.join(faster)}; [out, in] for the rest" if faster else "all [out, in]"))
    return agree_on_layouts(choices), summary


def enable_activation_checkpointing(model: Transformer, part: str = "block") -> None:
    """Recompute activations during backward: whole blocks, or only each block's attention or MLP (selective
    recomputation keeps the rest, trading less memory saved for less compute). The model file and state-dict names
    stay unchanged; on a 4D grid the recomputed forward repeats its collectives in the same order on every rank."""
    if part == "none":
        return
    modules = {"block": list(model.blocks), "attention": [block.attn for block in model.blocks],
               "mlp": [block.mlp for block in model.blocks]}[part]
    for module in modules:
        forward = module.forward

        def checkpointed(self, *args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        module.forward = types.MethodType(checkpointed, module)
