"""The training loop: micro-batches with accumulation, clipping, schedule, evaluation, logging and checkpoints.

Entry point: train(config, explicit_model, resume) -> TrainResult.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tetra.adapters.lora import apply_lora, store_frozen_weights_in, train_added_token_rows
from tetra.adapters.peft_io import check_peft_names
from tetra.config import RunConfig
from tetra.data.batch import as_batch
from tetra.data.loader import PackedBatches
from tetra.data.packing import DocumentBatches
from tetra.data.shards import PreparedData
from tetra.errors import CheckpointError, ConfigError, TetraError
from tetra.files import write_json
from tetra.model import Transformer
from tetra.model.io import read_model_config
from tetra.parallel.parallelize import parallelize
from tetra.parallel.zero import ZeroOptimizer
from tetra.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_replicated_checkpoint
from tetra.train.distributed import any_rank, is_main_rank, launched_world_size, start_distributed
from tetra.train.losses import IGNORE_INDEX
from tetra.train.metrics import MetricsSink, flops_per_token, peak_flops, plot_losses, truncate_metrics
from tetra.train.neftune import attach_neftune
from tetra.train.optim import build_optimizer, lr_at, set_lr
from tetra.train.precision import choose_autocast_dtype
from tetra.train.progress import ProgressReporter
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
from tetra.train.signals import StopRequest
from tetra.train.torch_strategies import wrap_model


class NonFiniteLossError(TetraError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    """How a run ended."""

    run_dir: Path
    step: int
    last_loss: float
    stopped_by: str | None  # a signal name when stopped early
    checkpoint: Path | None


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

    def step(self, step: int) -> tuple[StepLoss, float]:
        """One optimizer step; returns its loss and the gradient norm before clipping."""
        train = self.config.train
        set_lr(self.optimizer, lr_at(step, train))
        batches = [self.train_batches.batch(step * train.grad_accum + micro).to(self.device, non_blocking=True)
                   for micro in range(train.grad_accum)]
        loss = self.replica.accumulate(self.forward_model, batches, train.goldfish, self.autocast)
        grad_norm = self.replica.finish_backward(self.model, train.grad_clip, self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
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


def _resume_folder(resume: str | None, run_dir: Path) -> Path | None:
    if not resume:
        if (run_dir / "metrics.jsonl").exists() or latest_checkpoint(run_dir):
            raise TetraError(f"{run_dir} already holds a run. Continue it with --resume auto, or start a new one "
                             "in another folder (run.dir=...) or after removing this one.")
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    folder = Path(resume)
    if not folder.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint folder. Use --resume auto to take the newest "
                              f"checkpoint under {run_dir / 'checkpoints'}.")
    return folder


def _with_auto_grid(config: RunConfig, explicit_model: dict[str, Any], data: PreparedData) -> RunConfig:
    """Replace the grid (and per-rank batch) by the performance model's best for the launched world size."""
    if config.init.checkpoint:
        model_config = read_model_config(config.init.checkpoint)
    else:
        model_config = resolve_model_config(config, explicit_model, data)
    config, summary = auto_grid(config, model_config, launched_world_size())
    if int(os.environ.get("RANK", "0")) == 0:  # the process group does not exist yet
        sys.stderr.write(summary + "\n")
    return config


def build_loop(config: RunConfig, explicit_model: dict[str, Any]) -> tuple[Loop, Path]:
    data = PreparedData.open(config.data.path)
    if config.parallel.auto:
        config = _with_auto_grid(config, explicit_model, data)
    grid, device = start_distributed(config)
    strategy = config.parallel.strategy if grid is not None else "4d"
    replica = Replica(grid, zero1=config.parallel.zero1, strategy=strategy)
    train_batches, val_batches = _open_batches(config, data, replica)
    model, tokenizer_folder = build_model_for_run(config, explicit_model, data, device)
    if config.lora.enabled:
        apply_lora(model, config.lora, base=config.init.checkpoint or None, seed=config.train.seed)
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
    if model.config.recurrent:  # r drawn per training forward; evaluation runs the mean
        attach_recurrence_sampler(model)
    if config.train.progressive_loss > 0:
        if not model.config.looped:
            raise ConfigError(f"train.progressive_loss = {config.train.progressive_loss} trains a looped model's "
                              "passes, but this model has no loop; set model.loop = R (R > 1) or drop the key.")
        replica.progressive = ProgressiveLoss(model, config.train.progressive_loss)
    if config.train.neftune.alpha > 0:  # on the modules training runs: after the grid has replaced them
        attach_neftune(model, config.train.neftune.alpha, grid if replica.splits_model else None)
    if config.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    forward_model = wrap_model(model, strategy, device)  # DDP wraps; FSDP2 shards the model in place
    forward_model = torch.compile(forward_model) if config.train.compile else forward_model
    optimizer = build_optimizer(model, config.train, grid if replica.splits_model else None, config.parallel.zero1)
    # Training's own random draws (NEFTune's noise, LoRA's dropout) start here from train.seed, the same on every
    # rank whatever was drawn while building (layout timing on rank 0 only); a resume restores the saved state.
    torch.manual_seed(config.train.seed)
    loop = Loop(config, model, forward_model, optimizer, train_batches, val_batches, autocast_dtype, precision_reason,
                device, replica, gemm_layouts)
    return loop, tokenizer_folder


@dataclass
class Throughput:
    """Tokens and FLOPs of one optimizer step over all ranks, and the peak they are measured against."""

    tokens_per_step: int
    flops_per_step: float
    peak_flops: float  # of one device
    devices: int

    def record(self, steps: int, seconds: float) -> dict[str, float]:
        flops = self.flops_per_step * steps / seconds
        return {"tokens_per_s": self.tokens_per_step * steps / seconds, "tflops": flops / 1e12,
                "mfu": flops / (self.peak_flops * self.devices)}


def _start_run_folder(loop: Loop, run_dir: Path, resume_from: Path | None, config_toml: str) -> Throughput:
    """config.toml and run_info.json (main rank only), and the throughput bookkeeping."""
    config = loop.config
    peak, peak_source = peak_flops(loop.device, loop.autocast_dtype or torch.float32)
    devices = loop.replica.grid.shape.world if loop.replica.grid is not None else 1
    if is_main_rank():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(config_toml, encoding="utf-8")
        write_json(run_dir / "run_info.json", {
            "parameters": loop.model.config.num_parameters(), "precision": loop.precision_reason,
            "peak_flops": peak, "peak_source": peak_source, "device": str(loop.device), "devices": devices,
            "grid": None if loop.replica.grid is None else vars(loop.replica.grid.shape),
            "gemm_layouts": loop.gemm_layouts,
            "resumed_from": str(resume_from)})
    tokens = config.train.batch_size * config.train.grad_accum * config.data.seq_len * loop.replica.batch_ranks
    per_token = flops_per_token(loop.model.config, config.data.seq_len, frozen_weights=config.lora.enabled)
    return Throughput(tokens, per_token * tokens, peak, devices)


@dataclass
class LossInterval:
    """Losses summed since the last metrics line."""

    steps: int = 0
    loss: float = 0.0
    dropped_steps: int = 0
    dropped_loss: float = 0.0
    dropped_fraction: float = 0.0

    def add(self, step_loss: StepLoss) -> None:
        self.steps, self.loss = self.steps + 1, self.loss + step_loss.loss
        if step_loss.dropped_loss is not None:
            self.dropped_steps += 1
            self.dropped_loss += step_loss.dropped_loss
            self.dropped_fraction += step_loss.dropped_fraction or 0.0

    def means(self) -> dict[str, float]:
        """loss, and with the goldfish loss on, the loss on the left-out tokens and their share."""
        means = {"loss": self.loss / max(self.steps, 1)}
        if self.dropped_steps:
            means.update(goldfish_dropped_loss=self.dropped_loss / self.dropped_steps,
                         goldfish_dropped_fraction=self.dropped_fraction / self.dropped_steps)
        return means


def _check_finite(loss: float, step: int, run_dir: Path) -> None:
    if not math.isfinite(loss):
        last = latest_checkpoint(run_dir)
        raise NonFiniteLossError(
            f"The training loss became {loss} at step {step + 1}. The last good checkpoint is "
            f"{last or 'none (no checkpoint was written yet)'}. Lower train.lr, raise train.warmup_steps or "
            "set train.grad_clip, then resume from it with --resume auto.")


def train(config: RunConfig, explicit_model: dict[str, Any], resume: str | None = None,
          show_progress: bool = True) -> TrainResult:
    """Run (or resume) training as configured; the run folder gets config.toml, metrics.jsonl, checkpoints, loss.png.

    Under torchrun every rank calls this; rank 0 alone writes files."""
    run_dir = Path(config.run.dir)
    resume_from = _resume_folder(resume, run_dir)
    loop, tokenizer_folder = build_loop(config, explicit_model)
    config = loop.config  # parallel.auto may have chosen the grid and the per-rank batch
    grid = loop.replica.grid
    start_step = 0
    if resume_from is not None:
        model_grid = grid if loop.replica.splits_model else None  # DDP / FSDP2 load full tensors
        start_step = load_checkpoint(resume_from, loop.model, loop.optimizer, model_grid)["step"]
        if is_main_rank():
            truncate_metrics(run_dir / "metrics.jsonl", start_step)
    # The run folder records the model as built: vocabulary from the data, preset resolved.
    config_toml = dataclasses.replace(config, model=loop.model.config).to_toml()
    throughput = _start_run_folder(loop, run_dir, resume_from, config_toml)
    main = is_main_rank()
    sink = MetricsSink(run_dir, enabled=main)

    def save(step: int, last_loss: float) -> Path:
        samples = step * config.train.batch_size * config.train.grad_accum * loop.replica.batch_ranks
        state = {"samples": samples, "loss": last_loss,
                 "epoch": loop.train_batches.epoch_of(step * config.train.grad_accum)}
        if grid is not None and (not loop.replica.splits_model or config.lora.enabled):  # LoRA: adapters whole
            return save_replicated_checkpoint(run_dir, step, loop.model, loop.optimizer, state, config_toml,
                                              tokenizer_folder, config.run.keep_checkpoints,
                                              grid if loop.replica.splits_model else None)
        return save_checkpoint(run_dir, step, loop.model, loop.optimizer, state, config_toml, tokenizer_folder,
                               config.run.keep_checkpoints, grid)

    step, loss, saved, stopped_by = start_step, float("nan"), None, None
    interval_start, interval = time.perf_counter(), LossInterval()
    with StopRequest() as stop, ProgressReporter(config.train.max_steps, start_step, show_progress and main) as bar:
        while step < config.train.max_steps:
            step_loss, grad_norm = loop.step(step)
            loss = step_loss.loss
            _check_finite(loss, step, run_dir)
            step += 1
            interval.add(step_loss)
            record: dict[str, Any] = {"step": step, "loss": loss, "lr": lr_at(step - 1, config.train),
                                      "grad_norm": grad_norm}
            if step % config.run.log_every == 0 or step == config.train.max_steps:
                # The logged losses are means since the previous log line: one step alone is too noisy to read.
                record.update(interval.means(),
                              epoch=loop.train_batches.epoch_of(step * config.train.grad_accum),
                              **throughput.record(interval.steps, time.perf_counter() - interval_start))
                interval_start, interval = time.perf_counter(), LossInterval()
            if (config.eval.every and step % config.eval.every == 0) or step == config.train.max_steps:
                val_loss = loop.evaluate()
                if val_loss is not None:
                    record.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)))
            if "tokens_per_s" in record or "val_loss" in record:
                sink.write(record)
            bar.update(step, record)
            if config.run.checkpoint_every and step % config.run.checkpoint_every == 0:
                saved = save(step, loss)
            if any_rank(stop.requested is not None, loop.device):
                stopped_by = stop.requested or "a signal on another rank"
                break
    if saved is None or not saved.name.endswith(f"{step:07d}"):
        saved = save(step, loss)
    sink.close()
    if main:
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    if stopped_by and main:
        sys.stderr.write(f"stopped by {stopped_by} at step {step}; checkpoint {saved}. Continue with --resume auto.\n")
    return TrainResult(run_dir, step, loss, stopped_by, saved)
