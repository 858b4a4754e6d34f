"""Training measurements: FLOPs per token, peak FLOP/s (GPU table or a measured CPU GEMM), MFU, and the sinks
(metrics.jsonl, TensorBoard when installed, loss.png).

Entry points: flops_per_token, peak_flops, MetricsSink, plot_losses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from tetra.devices import measured_gemm_flops
from tetra.model.config import ModelConfig

# Dense bf16 tensor-core peaks (FLOP/s) from vendor datasheets, matched against torch.cuda.get_device_name().
GPU_BF16_PEAKS = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12),
    ("A10G", 70e12), ("L40S", 362e12), ("L4", 121e12), ("MI300X", 1307e12), ("MI250X", 383e12),
    ("MI250", 362e12), ("4090", 165e12), ("3090", 71e12),
)


def flops_per_token(config: ModelConfig, seq_len: int, frozen_weights: bool = False) -> float:
    """Training FLOPs per token: 6 x matmul parameters (head included) + 12 x layers x seq x attention width.
    frozen_weights (LoRA): 4 x, since frozen matrices need no weight gradient (the adapters' few FLOPs aside)."""
    matmul_parameters = config.num_parameters(include_embeddings=False) + config.vocab_size * config.hidden_size
    attention_width = config.n_heads * config.resolved_head_dim
    return (4 if frozen_weights else 6) * matmul_parameters + 12 * config.n_layers * seq_len * attention_width


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The peak MFU is measured against, and where it came from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_BF16_PEAKS:
            if key in name:
                return (peak if dtype == torch.bfloat16 else peak / 2), f"datasheet {name}"
        return measured_gemm_flops(dtype, device), f"measured GEMM on {name}"
    return measured_gemm_flops(dtype, device), f"measured {str(dtype).removeprefix('torch.')} GEMM on this CPU"


class MetricsSink:
    """Appends one JSON object per logged step to metrics.jsonl, and mirrors scalars to TensorBoard if present."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tensorboard = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop records logged after the checkpoint, so every step appears once."""
    records = [r for r in read_metrics(path) if r["step"] <= last_step]
    if path.is_file():
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """loss.png: training loss and validation loss against step."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=120)
    axis.plot(*zip(*train, strict=True), label="train loss", linewidth=1)
    if val:
        axis.plot(*zip(*val, strict=True), "o-", label="validation loss")
    axis.set_xlabel("step")
    axis.set_ylabel("cross-entropy (nats/token)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)
    return out
