"""The training loop: micro-batches with accumulation, clipping, schedule, evaluation, logging and checkpoints.

Entry point: train(config, explicit_model, resume) -> TrainResult.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tetra.config import RunConfig
from tetra.data.loader import PackedBatches
from tetra.data.shards import PreparedData
from tetra.devices import resolve_device
from tetra.errors import CheckpointError, TetraError
from tetra.files import write_json
from tetra.model import Transformer
from tetra.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tetra.train.losses import next_token_loss
from tetra.train.metrics import MetricsSink, flops_per_token, peak_flops, plot_losses, truncate_metrics
from tetra.train.optim import build_optimizer, lr_at, set_lr
from tetra.train.precision import choose_autocast_dtype
from tetra.train.progress import ProgressReporter
from tetra.train.setup import build_model_for_run, enable_activation_checkpointing
from tetra.train.signals import StopRequest


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
    optimizer: torch.optim.Optimizer
    train_batches: PackedBatches
    val_batches: PackedBatches | None
    autocast_dtype: torch.dtype | None
    precision_reason: str
    device: torch.device

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def step(self, step: int) -> tuple[float, float]:
        """One optimizer step; returns (mean loss, gradient norm before clipping)."""
        train = self.config.train
        lr = lr_at(step, train)
        set_lr(self.optimizer, lr)
        total = torch.zeros((), device=self.device)
        for micro in range(train.grad_accum):
            tokens = self.train_batches.batch(step * train.grad_accum + micro).to(self.device, non_blocking=True)
            with self.autocast():
                loss, _ = next_token_loss(self.forward_model, tokens)
            (loss / train.grad_accum).backward()
            total += loss.detach()
        max_norm = train.grad_clip if train.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (total / train.grad_accum).item(), float(grad_norm)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the configured number of batches (the same batches every time)."""
        if self.val_batches is None:
            return None
        self.model.eval()
        losses = []
        available = -(-self.val_batches.num_sequences // self.val_batches.batch_size)  # no sequence counted twice
        for position in range(min(self.config.eval.batches, available)):
            tokens = self.val_batches.batch(position).to(self.device)
            with self.autocast():
                losses.append(next_token_loss(self.forward_model, tokens)[0].item())
        self.model.train()
        return sum(losses) / len(losses)


def _open_batches(config: RunConfig, data: PreparedData) -> tuple[PackedBatches, PackedBatches | None]:
    train = PackedBatches(data.split("train"), config.data.seq_len, config.train.batch_size, config.data.seed)
    val = None
    if data.meta["splits"]["val"]["tokens"] > config.data.seq_len:
        val = PackedBatches(data.split("val"), config.data.seq_len, config.train.batch_size, shuffle=False)
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


def build_loop(config: RunConfig, explicit_model: dict[str, Any]) -> tuple[Loop, Path]:
    device = resolve_device(config.run.device)
    data = PreparedData.open(config.data.path)
    train_batches, val_batches = _open_batches(config, data)
    model, tokenizer_folder = build_model_for_run(config, explicit_model, data, device)
    if config.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    forward_model = torch.compile(model) if config.train.compile else model
    optimizer = build_optimizer(model, config.train)
    autocast_dtype, precision_reason = choose_autocast_dtype(config.train.precision, device)
    loop = Loop(config, model, forward_model, optimizer, train_batches, val_batches, autocast_dtype, precision_reason,
                device)
    return loop, tokenizer_folder


def train(config: RunConfig, explicit_model: dict[str, Any], resume: str | None = None,
          show_progress: bool = True) -> TrainResult:
    """Run (or resume) training as configured; the run folder gets config.toml, metrics.jsonl, checkpoints, loss.png."""
    run_dir = Path(config.run.dir)
    resume_from = _resume_folder(resume, run_dir)
    loop, tokenizer_folder = build_loop(config, explicit_model)
    start_step = 0
    if resume_from is not None:
        start_step = load_checkpoint(resume_from, loop.model, loop.optimizer)["step"]
        truncate_metrics(run_dir / "metrics.jsonl", start_step)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_toml = config.to_toml()
    (run_dir / "config.toml").write_text(config_toml, encoding="utf-8")
    peak, peak_source = peak_flops(loop.device, loop.autocast_dtype or torch.float32)
    write_json(run_dir / "run_info.json", {
        "parameters": sum(p.numel() for p in loop.model.parameters()), "precision": loop.precision_reason,
        "peak_flops": peak, "peak_source": peak_source, "device": str(loop.device), "resumed_from": str(resume_from)})
    sink = MetricsSink(run_dir)
    tokens_per_step = config.train.batch_size * config.train.grad_accum * config.data.seq_len
    step_flops = flops_per_token(loop.model.config, config.data.seq_len) * tokens_per_step

    def save(step: int, last_loss: float) -> Path:
        state = {"samples": step * config.train.batch_size * config.train.grad_accum, "loss": last_loss,
                 "epoch": loop.train_batches.epoch_of(step * config.train.grad_accum)}
        return save_checkpoint(run_dir, step, loop.model, loop.optimizer, state, config_toml, tokenizer_folder,
                               config.run.keep_checkpoints)

    step, loss, saved, stopped_by = start_step, float("nan"), None, None
    reporter = ProgressReporter(config.train.max_steps, start_step, enabled=show_progress)
    interval_start, interval_steps, interval_loss = time.perf_counter(), 0, 0.0
    with StopRequest() as stop, reporter:
        while step < config.train.max_steps:
            loss, grad_norm = loop.step(step)
            if not math.isfinite(loss):
                last = latest_checkpoint(run_dir)
                raise NonFiniteLossError(
                    f"The training loss became {loss} at step {step + 1}. The last good checkpoint is "
                    f"{last or 'none (no checkpoint was written yet)'}. Lower train.lr, raise train.warmup_steps or "
                    "set train.grad_clip, then resume from it with --resume auto.")
            step += 1
            interval_steps += 1
            interval_loss += loss
            record: dict[str, Any] = {"step": step, "loss": loss, "lr": lr_at(step - 1, config.train),
                                      "grad_norm": grad_norm}
            if step % config.run.log_every == 0 or step == config.train.max_steps:
                seconds = time.perf_counter() - interval_start
                # The logged loss is the mean since the previous log line: one step alone is too noisy to read.
                record.update(loss=interval_loss / interval_steps,
                              tokens_per_s=tokens_per_step * interval_steps / seconds,
                              tflops=step_flops * interval_steps / seconds / 1e12,
                              mfu=step_flops * interval_steps / seconds / peak,
                              epoch=loop.train_batches.epoch_of(step * config.train.grad_accum))
                interval_start, interval_steps, interval_loss = time.perf_counter(), 0, 0.0
            if (config.eval.every and step % config.eval.every == 0) or step == config.train.max_steps:
                val_loss = loop.evaluate()
                if val_loss is not None:
                    record.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)))
            if "tokens_per_s" in record or "val_loss" in record:
                sink.write(record)
            reporter.update(step, record)
            if config.run.checkpoint_every and step % config.run.checkpoint_every == 0:
                saved = save(step, loss)
            if stop.requested:
                stopped_by = stop.requested
                break
    if saved is None or not saved.name.endswith(f"{step:07d}"):
        saved = save(step, loss)
    sink.close()
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    if stopped_by:
        sys.stderr.write(f"stopped by {stopped_by} at step {step}; checkpoint {saved}. Continue with --resume auto.\n")
    return TrainResult(run_dir, step, loss, stopped_by, saved)
