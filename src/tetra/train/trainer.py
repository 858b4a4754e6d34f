"""The training loop: steps with their checks (non-finite values, spikes, signals), evaluation, logging and
checkpoints.

Entry point: train(config, explicit_model, resume) -> TrainResult.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tetra.config import RunConfig
from tetra.devices import resolve_device
from tetra.errors import TetraError
from tetra.files import write_json
from tetra.model.hf_export import export_hf_streaming
from tetra.train.checkpoint import latest_checkpoint, load_checkpoint
from tetra.train.checkpoint_write import CheckpointTarget
from tetra.train.checkpointer import Checkpointer
from tetra.train.distributed import agree_on_flags, is_main_rank, launched_world_size
from tetra.train.health import StepHealth, is_nonfinite
from tetra.train.loop import Loop, build_loop
from tetra.train.memory_advice import data_bytes, is_out_of_memory, out_of_memory_error
from tetra.train.metrics import MetricsSink, flops_per_token, peak_flops, plot_losses, truncate_metrics
from tetra.train.optim import lr_at
from tetra.train.progress import ProgressReporter
from tetra.train.replica import StepLoss
from tetra.train.resume import check_resume_request, choose_checkpoint
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
        means = {"loss": self.loss / self.steps} if self.steps else {}  # none when every step was skipped
        if self.dropped_steps:
            means.update(goldfish_dropped_loss=self.dropped_loss / self.dropped_steps,
                         goldfish_dropped_fraction=self.dropped_fraction / self.dropped_steps)
        return means


def _nonfinite_error(step_loss: StepLoss, grad_norm: float, step: int, run_dir: Path,
                     health: StepHealth) -> NonFiniteLossError:
    what = f"loss became {step_loss.loss}" if not math.isfinite(step_loss.loss) else f"gradient norm became {grad_norm}"
    repeated = (f" ({health.in_row} non-finite steps in a row; train.max_nonfinite_skips = {health.max_in_row})"
                if health.policy == "skip" else "")
    last = latest_checkpoint(run_dir)
    return NonFiniteLossError(
        f"The training {what} at step {step + 1}{repeated}. The last good checkpoint is "
        f"{last or 'none (no checkpoint was written yet)'}. Lower train.lr, raise train.warmup_steps or set "
        "train.grad_clip (or train.on_nonfinite = \"skip\" to drop such updates), then resume from it with "
        "--resume auto.")


@dataclass
class RunState:
    """Where the loop stands."""

    step: int
    loss: float = float("nan")
    saved: Path | None = None
    stopped_by: str | None = None


def _warn(main: bool, text: str) -> None:
    if main:
        sys.stderr.write(f"warning: {text}\n")


def _spike_record(loop: Loop, health: StepHealth, loss: float, step: int, run_dir: Path) -> dict[str, Any]:
    """{"loss_spike": ...} with the step's data positions when its loss is a spike (warned about), else {}."""
    spike = health.spike(loss)
    if spike is None:
        return {}
    positions = loop.positions(step - 1)
    _warn(is_main_rank(), f"loss spike at step {step}: {loss:.4f} against a recent mean of {spike[0]:.4f} "
          f"(deviation {spike[1]:.4f}); the step read data positions {positions.start}-{positions.stop - 1} (epoch "
          f"{loop.train_batches.epoch_of(positions.start):.3f}); see them with `tetra data inspect {run_dir} "
          f"--position {positions.start}`")
    return {"loss_spike": {"recent_mean": spike[0], "recent_deviation": spike[1],
                           "data_positions": [positions.start, positions.stop - 1]}}


def _run_steps(loop: Loop, run: RunState, run_dir: Path, throughput: Throughput, sink: MetricsSink,
               health: StepHealth, save: Callable[[int, float], Path], show_progress: bool) -> None:
    """Steps until max_steps or a stop signal. Before each update the ranks agree (one all-reduce) on a non-finite
    loss or gradient norm anywhere, a stop and a checkpoint request, so they all take the same branch."""
    config, main = loop.config, is_main_rank()
    interval_start, interval = time.perf_counter(), LossInterval()
    with StopRequest() as stop, ProgressReporter(config.train.max_steps, run.step, show_progress and main) as bar:
        while run.step < config.train.max_steps:
            step_loss, grad_norm = loop.compute(run.step)
            nonfinite, stop_now, checkpoint_now = agree_on_flags(
                [is_nonfinite(step_loss.loss, grad_norm), stop.requested is not None, stop.checkpoint_requested],
                loop.device)
            verdict = health.verdict(nonfinite)
            if verdict == "stop":
                raise _nonfinite_error(step_loss, grad_norm, run.step, run_dir, health)
            if verdict == "skip":
                positions = loop.positions(run.step)
                loop.discard()
                _warn(main, f"step {run.step + 1}: a non-finite loss or gradient norm on some rank (here loss "
                      f"{step_loss.loss}, gradient norm {grad_norm}); update skipped ({health.in_row} in a row, "
                      f"{health.skipped} in all); it read data positions {positions.start}-{positions.stop - 1}")
            else:
                loop.apply()
            run.step += 1
            step = run.step
            record: dict[str, Any] = {"step": step, "lr": lr_at(step - 1, config.train),
                                      "grad_norm": grad_norm if math.isfinite(grad_norm) else None}
            if verdict == "ok":
                run.loss = step_loss.loss
                interval.add(step_loss)
                record.update(loss=step_loss.loss, **_spike_record(loop, health, step_loss.loss, step, run_dir))
            else:
                record["skipped"] = True
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
            if {"tokens_per_s", "val_loss", "skipped", "loss_spike"} & record.keys():
                sink.write({**record, **health.counters()})
            bar.update(step, record)
            if (config.run.checkpoint_every and step % config.run.checkpoint_every == 0) or checkpoint_now:
                run.saved = save(step, run.loss)
                stop.checkpoint_taken()
            if stop_now:
                run.stopped_by = stop.requested or "a signal on another rank"
                return


def _export_hf(checkpoint: Path, out: Path, lora: bool) -> None:
    """RUN/hf from the final checkpoint (rank 0; the others wait): streamed tensor by tensor, so no rank ever holds
    the whole model; a LoRA run's adapters are merged into their base."""
    if is_main_rank():
        if lora:
            from tetra.adapters.peft_io import load_model_with_adapter
            from tetra.model.io import save_hf_model

            save_hf_model(load_model_with_adapter(checkpoint, None), out, tokenizer_from=checkpoint, overwrite=True)
        else:
            export_hf_streaming(checkpoint, out, overwrite=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def train(config: RunConfig, explicit_model: dict[str, Any], resume: str | None = None,
          show_progress: bool = True) -> TrainResult:
    """Run (or resume) training as configured; the run folder gets config.toml, metrics.jsonl, checkpoints, loss.png.

    Under torchrun every rank calls this; rank 0 alone writes files. Running out of memory anywhere (building,
    loading, a step, a save) becomes a ResourceError naming what this grid needs and the planner's grid that fits;
    checkpoints already written stay as they are."""
    runtime = data_bytes()
    try:
        return _train(config, explicit_model, resume, show_progress)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        device = resolve_device(config.run.device)
        raise out_of_memory_error(config, explicit_model, device, launched_world_size(), runtime, error) from None


def _train(config: RunConfig, explicit_model: dict[str, Any], resume: str | None,
           show_progress: bool) -> TrainResult:
    run_dir = Path(config.run.dir)
    check_resume_request(resume, run_dir)
    loop, tokenizer_folder = build_loop(config, explicit_model)
    config = loop.config  # parallel.auto may have chosen the grid and the per-rank batch
    grid = loop.replica.grid
    resume_from = choose_checkpoint(resume, run_dir)
    health = StepHealth.of(config.train)
    run = RunState(step=0)
    if resume_from is not None:
        model_grid = grid if loop.replica.splits_model else None  # DDP / FSDP2 load full tensors
        state = load_checkpoint(resume_from, loop.model, loop.optimizer, model_grid)
        run.step, health.skipped = state["step"], state.get("nonfinite_skipped", 0)
        if is_main_rank():
            truncate_metrics(run_dir / "metrics.jsonl", run.step)
    # The run folder records the model as built: vocabulary from the data, preset resolved.
    config_toml = dataclasses.replace(config, model=loop.model.config).to_toml()
    throughput = _start_run_folder(loop, run_dir, resume_from, config_toml)
    main = is_main_rank()
    sink = MetricsSink(run_dir, enabled=main)
    replicated = grid is not None and (not loop.replica.splits_model or config.lora.enabled)  # LoRA: adapters whole
    checkpointer = Checkpointer(CheckpointTarget(run_dir, config_toml, tokenizer_folder, config.run.keep_checkpoints),
                                loop.model, loop.optimizer, grid if loop.replica.splits_model else None, replicated,
                                config.run.async_checkpoint)

    def save(step: int, last_loss: float, wait: bool = False) -> Path:
        samples = step * config.train.batch_size * config.train.grad_accum * loop.replica.batch_ranks
        state = {"samples": samples, "loss": last_loss, "nonfinite_skipped": health.skipped,
                 "epoch": loop.train_batches.epoch_of(step * config.train.grad_accum)}
        return checkpointer.save(step, state, wait)

    try:
        _run_steps(loop, run, run_dir, throughput, sink, health, save, show_progress)
        if run.saved is None or not run.saved.name.endswith(f"{run.step:07d}"):
            run.saved = save(run.step, run.loss, wait=True)
    finally:
        checkpointer.close()  # a save in flight is published before the run ends, whatever ended it
    if config.run.export_hf and run.stopped_by is None:
        _export_hf(run.saved, run_dir / "hf", config.lora.enabled)
    sink.close()
    if main:
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    if run.stopped_by and main:
        sys.stderr.write(f"stopped by {run.stopped_by} at step {run.step}; checkpoint {run.saved}. Continue with "
                         "--resume auto.\n")
    return TrainResult(run_dir, run.step, run.loss, run.stopped_by, run.saved)
