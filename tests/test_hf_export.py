"""Streaming export (tetra convert to-hf): one tensor at a time from a single-file or sharded checkpoint, with files
equal byte for byte to the gathered export (save_hf_model of the loaded model), for all five families, tied and
untied heads, several shards and a dtype change."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from hf_factory import FAMILY_VARIANTS
from tetra.cli import main
from tetra.model import io as model_io
from tetra.model import sharded_io
from tetra.model.checkpoint_tensors import CheckpointTensors
from tetra.model.hf_export import export_hf_streaming
from tetra.model.io import load_model, save_hf_model, save_model


def same_files(first: Path, second: Path) -> None:
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def sharded_copy(checkpoint: Path, out: Path) -> Path:
    """The checkpoint with its weights as torch.distributed.checkpoint shards, as a parallel run writes them."""
    import torch.distributed.checkpoint as dcp

    out.mkdir()
    (out / "model_config.json").write_bytes((checkpoint / "model_config.json").read_bytes())
    tensors = {f"model/{name}": value for name, value in load_model(checkpoint).state_dict().items()
               if name in CheckpointTensors(checkpoint).shapes}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(tensors, checkpoint_id=str(out / "shards"), no_dist=True)
    return out


@pytest.mark.parametrize("variant", [*FAMILY_VARIANTS, "llama-gqa4-tied"])
def test_streamed_export_equals_the_gathered_one(variant, hf_folder, tmp_path, monkeypatch):
    _, folder = hf_folder(variant)
    checkpoint = save_model(load_model(folder), tmp_path / "checkpoint")
    sharded = sharded_copy(checkpoint, tmp_path / "sharded")
    for source in (checkpoint, sharded):
        for dtype, shard_bytes in ((None, 5 * 2**30), (torch.bfloat16, 30_000)):
            gathered = load_model(source, dtype=dtype)
            expected = save_hf_model(gathered, tmp_path / f"gathered-{source.name}-{dtype}",
                                     tokenizer_from=source, max_shard_bytes=shard_bytes)
            with monkeypatch.context() as patch:  # the whole model is never read at once
                for module, name in ((model_io, "read_model_tensors"), (sharded_io, "read_sharded_tensors")):
                    patch.setattr(module, name, lambda *args, **kwargs: pytest.fail("read the whole model"))
                streamed = export_hf_streaming(source, tmp_path / f"streamed-{source.name}-{dtype}",
                                               max_shard_bytes=shard_bytes, dtype=dtype)
            same_files(expected, streamed)
            if shard_bytes < 2**20:
                assert (streamed / "model.safetensors.index.json").is_file()


def test_convert_streams_a_sharded_checkpoint(hf_folder, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    original, folder = hf_folder("gpt2")
    checkpoint = save_model(load_model(folder), tmp_path / "checkpoint")
    sharded = sharded_copy(checkpoint, tmp_path / "sharded")
    assert main(["convert", "to-hf", str(sharded), str(tmp_path / "hf"), "--json"]) == 0
    assert '"parameters": ' + str(sum(p.numel() for p in original.parameters())) in capsys.readouterr().out
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    for name, value in original.state_dict().items():
        if name in reloaded.state_dict():
            assert torch.equal(reloaded.state_dict()[name], value), name


def test_a_checkpoint_of_another_shape_is_refused_before_writing(hf_folder, tmp_path, capsys):
    _, folder = hf_folder("llama-gqa2")
    checkpoint = save_model(load_model(folder), tmp_path / "checkpoint")
    config = (checkpoint / "model_config.json").read_text().replace('"n_layers": 2', '"n_layers": 3')
    (checkpoint / "model_config.json").write_text(config)
    assert main(["convert", "to-hf", str(checkpoint), str(tmp_path / "hf")]) == 2
    assert "blocks.2" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_streamed_files_equal_safetensors_own_with_mixed_dtypes(tmp_path):
    from tetra.model.safetensors_io import write_tensors
    from tetra.model.safetensors_stream import write_streamed

    generator = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(2, 3, generator=generator), "a.weight": torch.randn(3).bfloat16(),
               "c": torch.randn(1).half(), "d": torch.arange(2), "e": torch.randn(2).double(),
               "z": torch.randn(50, 7, generator=generator), "flag": torch.tensor([True, False])}
    for limit in (5 * 2**30, 100):
        write_tensors(tensors, (tmp_path / f"own-{limit}").mkdir() or tmp_path / f"own-{limit}", max_shard_bytes=limit)
        write_streamed([(name, tuple(value.shape), value.dtype) for name, value in tensors.items()],
                       tensors.__getitem__, (tmp_path / f"streamed-{limit}").mkdir() or tmp_path / f"streamed-{limit}",
                       max_shard_bytes=limit)
        same_files(tmp_path / f"own-{limit}", tmp_path / f"streamed-{limit}")
