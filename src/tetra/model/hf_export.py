"""Exporting a tetra checkpoint (single-file or a parallel run's shards) to a Hugging Face folder one tensor at a
time: no step holds more than one output tensor (GPT-2's fused q/k/v: its three parts), so a model larger than
memory exports on a small machine. The files equal save_hf_model's byte for byte.

Entry point: export_hf_streaming(folder, out, max_shard_bytes, overwrite, dtype).
"""

from __future__ import annotations

from pathlib import Path

import torch

from tetra.model.checkpoint_tensors import CheckpointTensors
from tetra.model.hf_weights import hf_tensor_plan
from tetra.model.io import check_tensors, read_model_config, write_hf_folder
from tetra.model.safetensors_stream import write_streamed
from tetra.model.transformer import Transformer


def export_hf_streaming(folder: str | Path, out: str | Path, max_shard_bytes: int = 5 * 2**30,
                        overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """A Hugging Face folder from a tetra checkpoint folder, streaming; dtype converts every tensor on the way."""
    folder = Path(folder)
    config = read_model_config(folder)
    tensors = CheckpointTensors(folder)
    with torch.device("meta"):
        expected = Transformer(config).state_dict()  # the names, shapes and order a loaded model would save
    if config.tie_embeddings:
        expected.pop("head.weight")
    check_tensors({name: value.shape for name, value in expected.items()},
                  {name: torch.empty(shape, device="meta") for name, shape in tensors.shapes.items()}, folder)
    plan = hf_tensor_plan(config.family, [name for name in expected if name in tensors.shapes],
                          config.tie_embeddings)
    config.dtype = str(dtype or tensors.dtypes["embed.weight"]).removeprefix("torch.")
    planned = [(item.name, item.shape(tensors.shapes), dtype or tensors.dtypes[item.sources[0]]) for item in plan]
    by_name = {item.name: item for item in plan}

    def produce(name: str) -> torch.Tensor:
        value = by_name[name].build(tensors.read)
        return value.to(dtype) if dtype is not None else value

    return write_hf_folder(config, lambda staging: write_streamed(planned, produce, staging,
                                                                  max_shard_bytes=max_shard_bytes),
                           out, folder, overwrite)
