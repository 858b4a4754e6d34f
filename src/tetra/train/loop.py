"""What one training step needs, built once: data, model (parallelized, adapted), optimizer, precision; and the
step itself, split so the loop can check it before the update lands.

Entry points: build_loop(config, explicit_model) -> (Loop, tokenizer folder); global_micro_batch(run_dir, position).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tetra.adapters.lora import LoRAWeights, apply_lora, store_frozen_weights_in, train_added_token_rows
from tetra.adapters.peft_io import check_peft_names
from tetra.config import RunConfig, recomputed_part
from tetra.data.batch import Batch, as_batch
from tetra.data.loader import PackedBatches
from tetra.data.packing import DocumentBatches
from tetra.data.shards import PreparedData
from tetra.devices import keep_freed_memory
from tetra.errors import ConfigError, DataError
from tetra.model import Transformer
from tetra.model.io import read_model_config
from tetra.model.weight_sources import CheckpointWeights, ZeroWeights
from tetra.parallel.materialize import materialize
from tetra.parallel.parallelize import parallelize
from tetra.parallel.zero import ZeroOptimizer
from tetra.train.distributed import Launch, is_main_rank, launched_world_size, start_distributed
from tetra.train.losses import IGNORE_INDEX
from tetra.train.neftune import attach_neftune
from tetra.train.optim import build_optimizer, lr_at, set_lr
from tetra.train.precision import choose_autocast_dtype
from tetra.train.progressive import ProgressiveLoss
from tetra.train.recurrence import attach_recurrence_sampler
from tetra.train.replica import Replica, StepLoss
from tetra.train.setup import (
    auto_grid,
    build_model_for_run,
    enable_activation_checkpointing,
    gemm_layouts_for_run,
    resolve_model_config,
)
from tetra.train.sharded_checkpoint import load_shards
from tetra.train.torch_strategies import materialize_fsdp, wrap_model


@dataclass
class Loop:
    """What one training step needs, built once."""

    config: RunConfig
    model: Transformer
    forward_model: torch.nn.Module  # the compiled model when train.compile is on
    optimizer: torch.optim.Optimizer | ZeroOptimizer
    train_batches: PackedBatches | DocumentBatches
    val_batches: PackedBatches | DocumentBatches | None
    autocast_dtype: torch.dtype | None
    precision_reason: str
    device: torch.device
    replica: Replica
    gemm_layouts: dict[str, str] = dataclasses.field(default_factory=dict)  # "out x in" block -> storage layout

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def compute(self, step: int) -> tuple[StepLoss, float]:
        """Forward, backward, gradient reduction and clipping of one step; returns its loss and the gradient norm
        before clipping. apply() or discard() finishes the step."""
        train = self.config.train
        set_lr(self.optimizer, lr_at(step, train))
        batches = [self.train_batches.batch(position).to(self.device, non_blocking=True)
                   for position in self.positions(step)]
        loss = self.replica.accumulate(self.forward_model, batches, train.goldfish, self.autocast)
        grad_norm = self.replica.finish_backward(self.model, train.grad_clip, self.optimizer)
        return loss, grad_norm

    def positions(self, step: int) -> range:
        """The data positions (micro-batch indices) a step reads."""
        return range(step * self.config.train.grad_accum, (step + 1) * self.config.train.grad_accum)

    def apply(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard(self) -> None:
        """Drop this step's gradients: the weights and optimizer state stay as they were."""
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, step: int) -> tuple[StepLoss, float]:
        """One whole optimizer step (benchmarks); the training loop checks the step before applying it."""
        loss, grad_norm = self.compute(step)
        self.apply()
        return loss, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the configured number of batches (the same batches every time), on every
        token: the goldfish mask shapes training only."""
        if self.val_batches is None:
            return None
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss, labels
        per_position = self.val_batches.batch_size * self.replica.batch_ranks
        available = -(-self.val_batches.num_sequences // per_position)  # no sequence counted twice
        for position in range(min(self.config.eval.batches, available)):
            batch = as_batch(self.val_batches.batch(position)).to(self.device)
            with self.autocast():
                losses = self.replica.token_losses(self.forward_model, batch)
            sums += torch.stack([losses.sum().double(), (batch.labels != IGNORE_INDEX).sum().double()])
        self.model.train()
        loss_sum, labels = (float(value) for value in self.replica.total(sums))
        return loss_sum / max(labels, 1.0)


Batches = PackedBatches | DocumentBatches


def _open_batches(config: RunConfig, data: PreparedData, replica: Replica) -> tuple[Batches, Batches | None]:
    """Each rank of the batch group (data x depth) reads its own disjoint share of every global batch; chat data
    (and data.packing = documents) packs whole documents, plain text is cut from one stream."""
    share = dict(rank=replica.batch_rank, world_size=replica.batch_ranks)
    packing = config.data.packing
    if packing == "stream" and data.has_loss_mask:
        raise ConfigError(f"data.packing = \"stream\" cuts sequences across conversations and would ignore the loss "
                          f"mask of {data.folder}; chat data trains with data.packing = \"documents\" (or auto).")
    if packing == "documents" or (packing == "auto" and data.has_loss_mask):
        pad = dict(pad_id=int(data.meta.get("pad_id", data.eos_id)))
        train = DocumentBatches(data.split("train"), config.data.seq_len, config.train.batch_size, config.data.seed,
                                **share, **pad)
        val = None
        if data.meta["splits"]["val"]["documents"] > 0:
            val = DocumentBatches(data.split("val"), config.data.seq_len, config.train.batch_size, shuffle=False,
                                  **share, **pad)
        return train, val
    train = PackedBatches(data.split("train"), config.data.seq_len, config.train.batch_size, config.data.seed, **share)
    val = None
    if data.meta["splits"]["val"]["tokens"] > config.data.seq_len:
        val = PackedBatches(data.split("val"), config.data.seq_len, config.train.batch_size, shuffle=False, **share)
    return train, val


def _with_auto_grid(config: RunConfig, explicit_model: dict[str, Any], data: PreparedData) -> RunConfig:
    """Replace the grid (and per-rank batch) by the performance model's best for the launched world size."""
    if config.init.checkpoint:
        model_config = read_model_config(config.init.checkpoint)
    else:
        model_config = resolve_model_config(config, explicit_model, data)
    config, summary = auto_grid(config, model_config, launched_world_size())
    if Launch.from_environment().rank == 0:  # the process group does not exist yet
        sys.stderr.write(summary + "\n")
    return config


def build_loop(config: RunConfig, explicit_model: dict[str, Any]) -> tuple[Loop, Path]:
    data = PreparedData.open(config.data.path)
    if config.parallel.auto:
        config = _with_auto_grid(config, explicit_model, data)
    grid, device = start_distributed(config)
    if config.train.keep_freed_memory:  # CPU: buffers reused every step stay mapped instead of faulting in again
        keep_freed_memory(device)
    strategy = config.parallel.strategy if grid is not None else "4d"
    replica = Replica(grid, zero1=config.parallel.zero1, strategy=strategy)
    train_batches, val_batches = _open_batches(config, data, replica)
    # A model the grid splits is built on the meta device: each rank then reads only its own pieces.
    on_meta = replica.splits_model or strategy == "fsdp2"
    model, tokenizer_folder, weights = build_model_for_run(config, explicit_model, data, device, on_meta)
    if config.lora.enabled:
        apply_lora(model, config.lora, base=config.init.checkpoint or None, seed=config.train.seed)
        if weights is not None:  # adapters on the meta device: drawn piece by piece like the base
            weights = LoRAWeights(weights, model, config.train.seed)
        check_peft_names(model)  # before training, not at the first checkpoint
        if hasattr(model, "added_token_rows"):  # new tokens (refusal tokens) need trainable embeddings
            if replica.splits_model:
                raise ConfigError("This data adds tokens to the vocabulary (refusal tokens), and LoRA on the 4D "
                                  "grid's tensor dimensions does not train new embedding rows yet. Train it on one "
                                  "process or with parallel.strategy=ddp.")
            train_added_token_rows(model, model.added_token_rows[0], config.lora.new_token_lr_scale)
    autocast_dtype, precision_reason = choose_autocast_dtype(config.train.precision, device)
    if config.lora.enabled and autocast_dtype is not None:
        store_frozen_weights_in(model, autocast_dtype)
    gemm_layouts: dict[str, str] = {}
    if replica.splits_model:
        layouts, summary = gemm_layouts_for_run(config, model, grid, device, autocast_dtype or torch.float32,
                                                is_main_rank())
        if summary and is_main_rank():
            sys.stderr.write(summary + "\n")
        gemm_layouts = {f"{out}x{in_}": layout for (out, in_), layout in sorted(layouts.items())}
        parallelize(model, grid, overlap=config.parallel.overlap, gemm_layouts=layouts,
                    regather=config.parallel.regather)
        if isinstance(weights, CheckpointWeights) and weights.sharded:  # a parallel run's shards: piece by piece
            materialize(model, grid, ZeroWeights(weights.shapes), device)
            load_shards(weights.folder, model, None, grid)
        elif weights is not None:
            materialize(model, grid, weights, device)
    if model.config.recurrent:  # r drawn per training forward; evaluation runs the mean
        attach_recurrence_sampler(model)
    if config.train.progressive_loss > 0:
        if not model.config.looped:
            raise ConfigError(f"train.progressive_loss = {config.train.progressive_loss} trains a looped model's "
                              "passes, but this model has no loop; set model.loop = R (R > 1) or drop the key.")
        replica.progressive = ProgressiveLoss(model, config.train.progressive_loss)
    if config.train.neftune.alpha > 0:  # on the modules training runs: after the grid has replaced them
        attach_neftune(model, config.train.neftune.alpha, grid if replica.splits_model else None)
    enable_activation_checkpointing(model, recomputed_part(config.train.activation_checkpointing))
    forward_model = wrap_model(model, strategy, device)  # DDP wraps; FSDP2 shards the model in place
    if weights is not None and strategy == "fsdp2":
        materialize_fsdp(model, weights, device)
    forward_model = torch.compile(forward_model) if config.train.compile else forward_model
    optimizer = build_optimizer(model, config.train, grid if replica.splits_model else None, config.parallel.zero1)
    # Training's own random draws (NEFTune's noise, LoRA's dropout) start here from train.seed, the same on every
    # rank whatever was drawn while building (layout timing on rank 0 only); a resume restores the saved state.
    torch.manual_seed(config.train.seed)
    loop = Loop(config, model, forward_model, optimizer, train_batches, val_batches, autocast_dtype, precision_reason,
                device, replica, gemm_layouts)
    return loop, tokenizer_folder


def global_micro_batch(run_dir: Path, position: int) -> tuple[Batch, PreparedData]:
    """The whole micro-batch a run read at a data position: every batch rank's rows, in rank order (a rank reads
    rows [r*B, (r+1)*B) of what one process with all the rows would). What a loss-spike warning points at."""
    from tetra.config import load_run_config
    from tetra.files import read_json

    if not (run_dir / "config.toml").is_file() or not (run_dir / "run_info.json").is_file():
        raise DataError(f"{run_dir} is not a training run folder (no config.toml / run_info.json). Pass the folder "
                        "`tetra train` wrote (its run.dir).")
    if position < 0:
        raise DataError(f"--position must be 0 or more (got {position}).")
    config, _ = load_run_config(run_dir / "config.toml")
    grid = read_json(run_dir / "run_info.json", "run description").get("grid") or {}
    ranks = max(grid.get("data", 1), 1) * max(grid.get("depth", 1), 1)
    whole = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                  batch_size=config.train.batch_size * ranks))
    data = PreparedData.open(config.data.path)
    batches, _ = _open_batches(whole, data, Replica(None))
    return as_batch(batches.batch(position)), data
