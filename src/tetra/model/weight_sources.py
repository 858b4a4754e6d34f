"""Where a model's starting weights come from, read region by region under tetra's names: random initialization,
a tetra checkpoint, a Hugging Face folder or a GGUF file. A rank of a split model asks only for its own pieces;
safetensors files are read with positioned reads of just those bytes (no memory map), so no full tensor is ever in
memory for them (GPT-2's transposed and fused Conv1D tensors included). GGUF tensors (quantized in blocks) and a
parallel run's DCP shards read here are read one full tensor at a time (on a grid, the trainer reads the shards with
load_shards instead).

Entry points: WeightSource (shapes + read(name, region)), RandomWeights, TensorDictWeights, ZeroWeights,
open_weights(path, model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from tetra.errors import CheckpointError
from tetra.files import is_gguf_file, read_json
from tetra.model.checkpoint_tensors import CheckpointTensors
from tetra.model.gguf_io import GGUFTensors
from tetra.model.hf_weights import BASE_MODEL_PREFIX, COPY, FUSED_QKV, IGNORED_SUFFIXES, hf_tensor_plan
from tetra.model.initialization import InitRule, Region, draw_region
from tetra.model.io import TETRA_CONFIG, check_tensors
from tetra.model.safetensors_slices import SafetensorsSlices
from tetra.model.sharded_io import has_shards
from tetra.model.transformer import Transformer


class WeightSource(Protocol):
    """Full shapes by tetra parameter name, and any rectangular region of one tensor."""

    shapes: Mapping[str, tuple[int, ...]]

    def read(self, name: str, region: Region) -> torch.Tensor: ...


def _cut(value: torch.Tensor, region: Region) -> torch.Tensor:
    return value[tuple(slice(start, stop) for start, stop in region)]


class RandomWeights:
    """The initial weights Transformer.init_weights(std, seed) would draw, any region alone."""

    def __init__(self, rules: Mapping[str, InitRule], shapes: Mapping[str, tuple[int, ...]], seed: int) -> None:
        self.rules, self.shapes, self.seed = rules, shapes, seed

    def read(self, name: str, region: Region) -> torch.Tensor:
        return draw_region(self.rules[name], name, self.shapes[name], region, self.seed)


class ZeroWeights:
    """Zeros of the given shapes: storage for values another reader fills in afterwards."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.shapes = shapes

    def read(self, name: str, region: Region) -> torch.Tensor:
        return torch.zeros(tuple(stop - start for start, stop in region))


class TensorDictWeights:
    """Full tensors already in memory (a model that was built whole; tests)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors
        self.shapes = {name: tuple(value.shape) for name, value in tensors.items()}

    def read(self, name: str, region: Region) -> torch.Tensor:
        return _cut(self.tensors[name], region)


class _SafetensorsFiles:
    """Every tensor name of a folder's safetensors files (single or indexed), and region reads from them."""

    def __init__(self, folder: Path, stem: str = "model") -> None:
        single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
        if single.is_file():
            files = [single]
        elif index.is_file():
            weight_map = read_json(index, "the safetensors shard index").get("weight_map", {})
            files = [folder / name for name in sorted(set(weight_map.values()))]
        else:
            raise CheckpointError(f"{folder} has no {single.name} and no {index.name}: it holds no model weights "
                                  "tetra can read (pickled .bin files are never loaded; re-save as safetensors).")
        self._file_of: dict[str, SafetensorsSlices] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in files:
            if not path.is_file():
                raise CheckpointError(f"{index} lists the shard {path.name}, which is missing from {folder}.")
            opened = SafetensorsSlices(path)
            self.shapes.update(opened.shapes)
            self._file_of.update(dict.fromkeys(opened.shapes, opened))

    def read(self, name: str, region: Region) -> torch.Tensor:
        return self._file_of[name].read(name, region)


class CheckpointWeights:
    """A tetra checkpoint: model.safetensors (region reads) or a parallel run's shards (one full tensor at a time)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sharded = not (folder / "model.safetensors").is_file() and \
            not (folder / "model.safetensors.index.json").is_file() and has_shards(folder)
        self._reader: _SafetensorsFiles | CheckpointTensors = CheckpointTensors(folder) if self.sharded \
            else _SafetensorsFiles(folder)
        self.shapes = self._reader.shapes

    def read(self, name: str, region: Region) -> torch.Tensor:
        if self.sharded:
            return _cut(self._reader.read(name), region)
        return self._reader.read(name, region)


@dataclass(frozen=True)
class _HfPart:
    """Where one tetra tensor lies in a Hugging Face tensor: as is, transposed, or one of GPT-2's fused q/k/v."""

    hf_name: str
    kind: str
    transposed: bool
    offset: int  # rows of the fused q/k/v tensor before this one (in tetra's [out, in] orientation)


class HfWeights:
    """A Hugging Face folder, read under tetra's names."""

    def __init__(self, folder: Path, model: Transformer) -> None:
        config = model.config
        self._files = _SafetensorsFiles(folder)
        prefix = BASE_MODEL_PREFIX[config.family]
        bare = not any(name.startswith(prefix) for name in self._files.shapes)  # a GPT2Model / OPTModel save
        wanted = _tetra_shapes(model)
        self._parts: dict[str, _HfPart] = {}
        for tensor in hf_tensor_plan(config.family, wanted, config.tie_embeddings):
            stored = tensor.name.removeprefix(prefix) if bare and not tensor.name.startswith("lm_head.") \
                else tensor.name
            for index, source in enumerate(tensor.sources):
                offset = index * wanted[source][0]
                self._parts[source] = _HfPart(stored, tensor.kind, tensor.kind != COPY and tensor.param == "weight",
                                              offset)
        shapes = {name: self._hf_shape_as_tetra(name) for name in wanted if name in self._parts}
        self.shapes = {name: shape for name, shape in shapes.items() if shape is not None}
        used = {part.hf_name for part in self._parts.values()}
        unknown = sorted(name for name in self._files.shapes if name not in used and not name.endswith(
            IGNORED_SUFFIXES) and name.removeprefix(prefix) != "lm_head.weight" and name != "lm_head.weight")
        if unknown:
            raise CheckpointError(f"{folder} has tensors a {config.family} model does not have: "
                                  f"{', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''}. It was probably "
                                  "saved from a different architecture than config.json names.")
        _check_shapes(wanted, self.shapes, folder)

    def _hf_shape_as_tetra(self, name: str) -> tuple[int, ...] | None:
        part = self._parts[name]
        if part.hf_name not in self._files.shapes:
            return None
        shape = self._files.shapes[part.hf_name]
        shape = tuple(reversed(shape)) if part.transposed else shape
        if part.kind == FUSED_QKV:
            shape = (shape[0] // 3, *shape[1:])
        return shape

    def read(self, name: str, region: Region) -> torch.Tensor:
        part = self._parts[name]
        rows = (region[0][0] + part.offset, region[0][1] + part.offset)
        if part.transposed:  # stored [in, out]: read the transposed rectangle, then turn it
            return self._files.read(part.hf_name, (region[1], rows)).t()
        return self._files.read(part.hf_name, (rows, *region[1:]))


def _tetra_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """Full shapes of a (meta) single-process model's parameters; a tied head is the embedding."""
    return {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}


def open_weights(path: str | Path, model: Transformer) -> WeightSource:
    """The weights at `path` (tetra checkpoint, Hugging Face folder or GGUF file) for `model` (built on the meta
    device from the same path's config), with every tensor's presence and shape checked before anything is read."""
    path = Path(path)
    wanted = _tetra_shapes(model)
    if is_gguf_file(path):
        source: WeightSource = _WholeTensors(GGUFTensors(path))
    elif (path / TETRA_CONFIG).is_file():
        source = CheckpointWeights(path)
    else:
        return HfWeights(path, model)
    # a tetra checkpoint of a tied model may carry the head's copy of the embedding: not an unexpected tensor
    found = {name: shape for name, shape in source.shapes.items() if name in wanted or name != "head.weight"}
    _check_shapes(wanted, found, path)
    return source


def _check_shapes(wanted: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]], path: Path) -> None:
    """io.check_tensors' refusal (missing, unexpected, wrongly shaped tensors), from shapes alone."""
    check_tensors({name: torch.Size(shape) for name, shape in wanted.items()},
                  {name: torch.empty(shape, device="meta") for name, shape in found.items()}, path)


class _WholeTensors:
    """A source that can only read whole tensors (GGUF's quantized blocks): read one, keep the region."""

    def __init__(self, tensors: GGUFTensors) -> None:
        self._tensors = tensors
        self.shapes = tensors.shapes

    def read(self, name: str, region: Region) -> torch.Tensor:
        return _cut(self._tensors.read(name), region)
