"""Run configuration: typed sections, TOML files, dotted key=value overrides, and validation of everything at once.

Entry points: load_run_config(path, overrides) -> RunConfig, and RunConfig.to_toml().
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tetra.errors import ConfigError
from tetra.model.config import ModelConfig


@dataclass
class InitConfig:
    """Where the model comes from: a named shape (random weights) or existing weights."""

    preset: str = ""  # a shape from tetra.model.presets (tiny, small, llama-1b, ...); [model] keys override it
    checkpoint: str = ""  # start from these weights: a tetra checkpoint or a Hugging Face folder (fine-tuning)
    std: float = 0.02  # initialization standard deviation for random weights


@dataclass
class DataConfig:
    """The prepared dataset (`tetra data prepare`) and how it is cut into sequences."""

    path: str = ""  # folder written by `tetra data prepare`
    seq_len: int = 256  # tokens per training sequence
    seed: int = 0  # order of the sequences; the same seed gives the same batches
    packing: str = "auto"  # stream (cut sequences from the joined text) | documents (whole documents per row, no
    # attention or loss across them) | auto (documents for data with a loss mask, i.e. chat data; else stream)


@dataclass
class GoldfishConfig:
    """Which target tokens the goldfish loss leaves out (train.goldfish.*)."""

    k: int = 0  # leave out 1 in k target tokens (0 = off: plain cross-entropy)
    context: int = 13  # h: tokens (ending at the target) that decide whether it is left out
    mode: str = "hash"  # hash (same text -> same mask anywhere) | static (every k-th position of a sequence)

    @property
    def enabled(self) -> bool:
        return self.k > 0

    def problems(self) -> list[str]:
        found = []
        if self.k < 0 or self.k == 1:
            found.append(f"train.goldfish.k must be 0 (off) or at least 2 (got {self.k}); k = 4 leaves out 1 token "
                         "in 4")
        if self.context < 1:
            found.append(f"train.goldfish.context must be at least 1 (got {self.context})")
        if self.mode not in ("hash", "static"):
            found.append(f"train.goldfish.mode = {self.mode!r}; choose one of hash, static")
        return found


@dataclass
class NEFTuneConfig:
    """Noisy input embeddings during fine-tuning (train.neftune.*)."""

    alpha: float = 0.0  # noise scale alpha (the paper uses 5, 10, 15); 0 = off


@dataclass
class LoRAConfig:
    """Which Linears get a low-rank adapter, and its shape ([lora] in a run config)."""

    rank: int = 0  # r: the adapter's rank (0 = LoRA off: full fine-tuning)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input (training only)
    targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])  # or "all-linear"
    # Learning-rate multiplier of added tokens' embedding rows (refusal tokens): they start at the mean embedding
    # and must travel far in few steps, which the adapters' learning rate alone does not allow.
    new_token_lr_scale: float = 20.0

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def problems(self) -> list[str]:
        found = []
        if self.rank < 0:
            found.append(f"lora.rank must be 0 (off) or positive (got {self.rank})")
        if not 0 <= self.dropout < 1:
            found.append(f"lora.dropout must be in [0, 1) (got {self.dropout})")
        if self.new_token_lr_scale <= 0:
            found.append(f"lora.new_token_lr_scale must be positive (got {self.new_token_lr_scale})")
        if self.enabled and not self.targets:
            found.append("lora.targets is empty: name the Linears to adapt (e.g. [\"q\", \"v\"] or [\"all-linear\"])")
        return found


RECOMPUTE_PARTS = ("none", "block", "attention", "mlp")


def recomputed_part(setting: bool | str) -> str:
    """train.activation_checkpointing as one of RECOMPUTE_PARTS (true means whole blocks)."""
    if isinstance(setting, bool):
        return "block" if setting else "none"
    return setting


@dataclass
class TrainConfig:
    """The optimization loop."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per micro-batch (per data-parallel rank)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # final learning rate as a fraction of the peak
    schedule: str = "cosine"  # cosine | wsd | linear | constant (all after a linear warmup)
    warmup_steps: int = 100  # steps of linear warmup from 0
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent decaying at the end
    weight_decay: float = 0.1  # AdamW decay, applied to matrices only (not norms, biases, embeddings)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    precision: str = "auto"  # auto | fp32 | bf16: autocast dtype; master weights stay fp32
    # Recompute activations in backward to save memory: true / "block" (whole blocks), "attention" or "mlp" (that part
    # of every block only), false / "none".
    activation_checkpointing: bool | str = False
    compile: bool = False  # torch.compile the model
    # CPU (glibc): keep freed memory for reuse instead of page-faulting it in again every step (about 7% faster
    # steps; the process holds its peak memory). Process-wide.
    keep_freed_memory: bool = True
    seed: int = 0  # initialization and dropout seed
    goldfish: GoldfishConfig = field(default_factory=GoldfishConfig)  # memorization-safe loss (off by default)
    neftune: NEFTuneConfig = field(default_factory=NEFTuneConfig)  # noisy embeddings for fine-tuning (off)
    progressive_loss: float = 0.0  # looped models: weight alpha of the progressive loss (train/progressive.py)
    optimizer: str = "adamw"  # adamw | galore (low-rank projected Adam) | conda (Adam in the momentum's SVD basis)
    galore_rank: int = 128  # galore: rank of the gradient projection of each block matrix
    galore_scale: float = 0.25  # galore: the projected update's scale
    projection_interval: int = 200  # galore / conda: steps between refreshes of the projection (or rotation)
    on_nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss or gradient norm does (skip drops the update)
    max_nonfinite_skips: int = 5  # skip: stop anyway after this many non-finite steps in a row
    spike_sigmas: float = 6.0  # warn when a step's loss is this many deviations above the recent mean (0 = off)
    spike_window: int = 100  # recent steps the loss-spike mean and deviation come from


@dataclass
class EvalConfig:
    """Validation during training."""

    every: int = 200  # evaluate every N steps (0 = only at the end)
    batches: int = 20  # validation micro-batches per evaluation


@dataclass
class ParallelConfig:
    """The 4D grid (launch with torchrun); 0 means infer: tensor dimensions 1, data takes the remaining ranks."""

    data: int = 0  # data-parallel replicas (each sees other samples)
    depth: int = 0  # ranks that shard each weight block (like FSDP inside the tensor-parallel block); other samples
    row: int = 0  # splits attention heads, the MLP width and the vocabulary
    col: int = 0  # splits the hidden size (innermost: the fastest links)
    strategy: str = "4d"  # 4d (this grid) | ddp | fsdp2: torch's DistributedDataParallel / fully_shard, as baselines
    overlap: bool = True  # run collectives in the background of computation (off: blocking, bit-identical results)
    gemm_layout: str = "auto"  # auto (time each weight shape once per device, cached) | out_in | in_out
    regather: bool = False  # gather depth-sharded weight blocks again in backward (less memory, slower) vs keep them
    zero1: bool = False  # also shard optimizer state over data (ZeRO-1): less memory, one more all-gather per step
    auto: bool = False  # let the performance model pick the grid (needs parallel.machine); overrides data/depth/row/col
    machine: str = ""  # machine profile for auto: a shipped name (perlmutter, ...) or a file from `tetra calibrate`


@dataclass
class RunSection:
    """Where the run writes and how often."""

    dir: str = "runs/run"  # run folder: config.toml, metrics.jsonl, checkpoints/, loss.png
    log_every: int = 10  # steps between metrics lines
    checkpoint_every: int = 500  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept; older ones are deleted
    async_checkpoint: bool = False  # write checkpoints in a background thread from an in-memory snapshot
    export_hf: bool = False  # at the end, write RUN/hf (a Hugging Face folder) from the final checkpoint, streamed
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class RunConfig:
    """Everything a `tetra train` run needs, one section per TOML table."""

    init: InitConfig = field(default_factory=InitConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved configuration as TOML (what the run folder's config.toml holds)."""
        return dump_toml(self.to_dict())


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _type_ok(value: Any, kind: Any) -> bool:
    """Whether a TOML value fits a field's annotation (ints are accepted for floats)."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, option) for option in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_type_ok(v, typing.get_args(kind)[0]) for v in value)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if _is_dataclass_type(kind):
        return isinstance(value, dict)
    return isinstance(value, kind)


def _build(cls: type, values: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    """Instantiate a dataclass from a dict, collecting unknown keys and type errors instead of stopping."""
    types_by_name = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in types_by_name:
            close = difflib.get_close_matches(key, types_by_name, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; known keys: {', '.join(types_by_name)}"
            problems.append(f"unknown key {name}{hint}")
            continue
        kind = types_by_name[key]
        if _is_dataclass_type(kind) and isinstance(value, dict):
            kwargs[key] = _build(kind, value, f"{name}.", problems)
        elif _type_ok(value, kind):
            kwargs[key] = float(value) if kind is float else value
        else:
            problems.append(f"{name} = {value!r} has the wrong type; expected {getattr(kind, '__name__', kind)}")
    return cls(**kwargs)


def build_section(cls: type, values: dict[str, Any], prefix: str = "") -> tuple[Any, list[str]]:
    """A dataclass from a dict of its fields (nested sections too), with every unknown key and wrong type listed:
    for other TOML files with the same rules (a sweep file)."""
    problems: list[str] = []
    return _build(cls, values, prefix, problems), problems


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); values are TOML literals, else plain strings."""
    if "=" not in text:
        raise ConfigError(f"Override {text!r} is not key=value (e.g. train.max_steps=200).")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (sections are created as needed)."""
    for text in overrides:
        path, value = parse_override(text)
        target = values
        for part in path[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"Override {text!r}: {part} is a value, not a section.")
        target[path[-1]] = value
    return values


def build_run_config(values: dict[str, Any]) -> RunConfig:
    """Typed RunConfig from a nested dict; every problem is reported in one ConfigError."""
    problems: list[str] = []
    config = _build(RunConfig, values, "", problems)
    problems += validate_run_config(config, explicit_model=values.get("model", {}))
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))
    return config


def _choice(problems: list[str], name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        problems.append(f"{name} = {value!r}; choose one of {', '.join(options)}")


def validate_run_config(config: RunConfig, explicit_model: dict[str, Any]) -> list[str]:
    """Problems with the values (not the keys); model shape problems come from ModelConfig.validate."""
    problems = []
    train, data = config.train, config.data
    for name, value in (("train.max_steps", train.max_steps), ("train.batch_size", train.batch_size),
                        ("train.grad_accum", train.grad_accum), ("data.seq_len", data.seq_len),
                        ("run.log_every", config.run.log_every), ("run.keep_checkpoints", config.run.keep_checkpoints)):
        if value < 1:
            problems.append(f"{name} must be at least 1 (got {value})")
    problems += [f"parallel.{name} must be >= 0 (got {value})" for name, value in vars(config.parallel).items()
                 if isinstance(value, int) and not isinstance(value, bool) and value < 0]
    _choice(problems, "parallel.strategy", config.parallel.strategy, ("4d", "ddp", "fsdp2"))
    _choice(problems, "parallel.gemm_layout", config.parallel.gemm_layout, ("auto", "out_in", "in_out"))
    if config.parallel.strategy != "4d":
        tensor_sizes = [f"parallel.{name} = {getattr(config.parallel, name)}" for name in ("depth", "row", "col")
                        if getattr(config.parallel, name) > 1]
        if tensor_sizes or config.parallel.zero1 or config.parallel.auto:
            problems.append(f"parallel.strategy = {config.parallel.strategy!r} splits only the batch; drop "
                            f"{', '.join(tensor_sizes) or 'parallel.zero1 / parallel.auto'} or use strategy 4d")
    if config.parallel.auto and not config.parallel.machine:
        problems.append("parallel.auto needs parallel.machine: a shipped profile (perlmutter, frontier, alps, "
                        "dgx-h100) or a file written by `tetra calibrate`")
    if train.lr <= 0:
        problems.append(f"train.lr must be positive (got {train.lr})")
    if not 0 <= train.min_lr_ratio <= 1:
        problems.append(f"train.min_lr_ratio must be in [0, 1] (got {train.min_lr_ratio})")
    if train.warmup_steps < 0 or train.warmup_steps > train.max_steps:
        problems.append(f"train.warmup_steps must be in [0, train.max_steps] (got {train.warmup_steps})")
    _choice(problems, "train.schedule", train.schedule, ("cosine", "wsd", "linear", "constant"))
    _choice(problems, "train.precision", train.precision, ("auto", "fp32", "bf16"))
    _choice(problems, "data.packing", data.packing, ("auto", "stream", "documents"))
    problems += train.goldfish.problems()
    problems += config.lora.problems()
    if config.lora.enabled and not config.init.checkpoint:
        problems.append("[lora] adapts a pretrained model: set init.checkpoint (LoRA checkpoints hold only the "
                        "adapters, so a random base could not be recovered)")
    _choice(problems, "train.optimizer", train.optimizer, ("adamw", "galore", "conda"))
    if train.galore_rank < 1 or train.projection_interval < 1:
        problems.append(f"train.galore_rank and train.projection_interval must be at least 1 (got "
                        f"{train.galore_rank}, {train.projection_interval})")
    if train.optimizer != "adamw" and (config.parallel.zero1 or config.parallel.strategy == "fsdp2"):
        problems.append(f"train.optimizer = {train.optimizer!r} keeps state shaped by whole matrices' singular "
                        "vectors, which ZeRO-1's and FSDP2's flat shards cut apart; drop parallel.zero1 / use "
                        "parallel.strategy = \"4d\" (its depth dimension shards this state like the weights) or "
                        "\"ddp\"")
    if isinstance(train.activation_checkpointing, str):
        _choice(problems, "train.activation_checkpointing", train.activation_checkpointing, RECOMPUTE_PARTS)
    _choice(problems, "train.on_nonfinite", train.on_nonfinite, ("stop", "skip"))
    if train.max_nonfinite_skips < 0 or train.spike_window < 2 or train.spike_sigmas < 0:
        problems.append(f"train.max_nonfinite_skips must be >= 0, train.spike_window >= 2 and train.spike_sigmas "
                        f">= 0 (got {train.max_nonfinite_skips}, {train.spike_window}, {train.spike_sigmas})")
    if not 0 <= train.progressive_loss <= 1:
        problems.append(f"train.progressive_loss must be in [0, 1] (got {train.progressive_loss})")
    if train.progressive_loss > 0 and config.parallel.strategy != "4d":
        problems.append("train.progressive_loss runs two forward passes per step, which torch's DDP and FSDP2 "
                        "wrappers do not allow before one backward; use parallel.strategy = \"4d\"")
    if train.neftune.alpha < 0:
        problems.append(f"train.neftune.alpha must be 0 (off) or positive (got {train.neftune.alpha})")
    if config.lora.enabled and (config.parallel.strategy == "fsdp2" or config.parallel.zero1):
        problems.append("LoRA trains on one process, on the 4D grid or with parallel.strategy = \"ddp\"; FSDP2 and "
                        "ZeRO-1 do not shard adapters (their optimizer state is small: leave parallel.zero1 off)")
    if not data.path:
        problems.append("data.path is empty: set it to a folder made by `tetra data prepare`")
    if config.init.preset and config.init.checkpoint:
        problems.append("set init.preset or init.checkpoint, not both")
    return problems


def read_toml(path: str | Path, kind: str = "Config file", examples: str = "configs/") -> dict[str, Any]:
    """A TOML file's values, or a ConfigError naming the missing or malformed file and where examples are."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} {path} does not exist. See {examples} for examples.")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}.") from None


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[RunConfig, dict]:
    """Read a TOML file (or nothing) plus overrides; returns the typed config and the raw [model] keys given."""
    values = read_toml(path) if path is not None else {}
    values = apply_overrides(values, overrides or [])
    return build_run_config(values), dict(values.get("model", {}))


def toml_value(value: Any) -> str:
    """One TOML value: scalars, lists, and inline tables for dicts."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_toml(values: dict[str, dict[str, Any]]) -> str:
    """Two-level TOML (tables of scalars, lists and inline tables); None values are left out."""
    lines = []
    for section, table in values.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items() if value is not None]
        lines.append("")
    return "\n".join(lines)
