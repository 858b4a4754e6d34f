"""Loki: keys scored in the top-r principal dimensions of a per-layer, per-KV-head PCA, then exact attention over
the k best. The basis is fitted offline (tetra loki calibrate) on post-rotary keys, the ones the cache holds and
queries meet.

Entry points: LokiBasis (load, save, fitted from key statistics), LokiCache, LOKI_FILE.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tetra.errors import ConfigError
from tetra.infer.attention.policy import AttentionPolicy
from tetra.infer.attention.topk import TopKCache
from tetra.infer.attention.union import gather_rows
from tetra.model.config import ModelConfig

LOKI_FILE = "loki.safetensors"


@dataclass
class LokiBasis:
    """Per layer: components [Hkv, D, D] (columns = principal directions, largest first) and their eigenvalues
    [Hkv, D]. The directions diagonalize the keys' second moment (uncentered: they preserve dot products q.k)."""

    components: list[torch.Tensor]
    eigenvalues: list[torch.Tensor]
    tokens: int  # keys the statistics came from

    @classmethod
    def from_moments(cls, moments: list[torch.Tensor], tokens: int) -> LokiBasis:
        """Eigen-decompose per-layer sums of k k^T [Hkv, D, D]."""
        components, eigenvalues = [], []
        for moment in moments:
            values, vectors = torch.linalg.eigh(moment.double() / max(tokens, 1))
            values, vectors = values.flip(-1), vectors.flip(-1)  # eigh sorts ascending; largest first here
            components.append(vectors.float().contiguous())
            eigenvalues.append(values.clamp(min=0).float().contiguous())
        return cls(components, eigenvalues, tokens)

    def explained(self, rank: int) -> list[float]:
        """Per layer, the mean (over KV heads) share of key energy in the top `rank` directions."""
        return [float((values[:, :rank].sum(-1) / values.sum(-1).clamp(min=1e-12)).mean())
                for values in self.eigenvalues]

    def save(self, path: str | Path) -> None:
        tensors = {}
        for layer, (vectors, values) in enumerate(zip(self.components, self.eigenvalues, strict=True)):
            tensors[f"layer.{layer}.components"] = vectors.contiguous()
            tensors[f"layer.{layer}.eigenvalues"] = values.contiguous()
        save_file(tensors, str(path), metadata={"format": "tetra-loki", "keys": "post-rotary",
                                                "tokens": str(self.tokens), "layers": str(len(self.components))})

    @classmethod
    def load(cls, path: str | Path) -> LokiBasis:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"No Loki calibration at {path}. Fit one with `tetra loki calibrate MODEL --data TEXT` "
                              "(it writes loki.safetensors into the model folder), or pass --loki FILE.")
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(str(path))
        except Exception as error:
            raise ConfigError(f"{path} is not a readable Loki calibration ({error}); fit it again with "
                              "`tetra loki calibrate`.") from None
        if metadata.get("format") != "tetra-loki":
            raise ConfigError(f"{path} is not a Loki calibration (no tetra-loki metadata); fit one with "
                              "`tetra loki calibrate`.")
        layers = int(metadata["layers"])
        return cls([tensors[f"layer.{i}.components"] for i in range(layers)],
                   [tensors[f"layer.{i}.eigenvalues"] for i in range(layers)], int(metadata.get("tokens", 0)))

    @classmethod
    def for_model(cls, config: ModelConfig, path: str | Path | None) -> LokiBasis:
        """The calibration a model decodes with, checked against its shape."""
        if path is None:
            raise ConfigError("--attention loki needs a calibration: pass --loki FILE (from `tetra loki "
                              "calibrate`; commands default to loki.safetensors in the model folder).")
        basis = cls.load(path)
        expected = (config.kv_heads, config.resolved_head_dim, config.resolved_head_dim)
        shapes = {tuple(vectors.shape) for vectors in basis.components}
        if len(basis.components) != config.n_layers or shapes != {expected}:
            found = f"{len(basis.components)} layers of {sorted(shapes)}"
            raise ConfigError(f"The Loki calibration {path} belongs to another model: it has {found}, this model "
                              f"needs {config.n_layers} layers of {expected} (KV heads, head dim, head dim). Fit it "
                              "for this model with `tetra loki calibrate`.")
        return basis


class LokiCache(TopKCache):
    """Besides the dense keys, the cache holds every key's coordinates in the top `rank` principal directions (a
    contiguous [.., rank] copy: rank/D more key memory, and a decode step reads only that to score the prefix); the
    k keys it picks then get exact logits. Prefill is dense and unchanged."""

    def __init__(self, config: ModelConfig, batch: int, max_length: int, dtype: torch.dtype,
                 device: torch.device | str, policy: AttentionPolicy, basis: LokiBasis) -> None:
        super().__init__(config, batch, max_length, dtype, device, policy)
        self.rank = min(policy.rank or max(1, config.resolved_head_dim // 4), config.resolved_head_dim)
        self.projections = [vectors[:, :, : self.rank].contiguous() for vectors in basis.components]
        self.low_rank_keys = torch.zeros((*self.keys.shape[:4], self.rank), dtype=dtype, device=device)

    def _projection(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        projection = self.projections[layer]
        if projection.device != like.device or projection.dtype != like.dtype:
            projection = self.projections[layer] = projection.to(like.device, like.dtype)
        return projection

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
               start: int) -> tuple[torch.Tensor, torch.Tensor]:
        low = torch.einsum("bhtd,hdr->bhtr", keys, self._projection(layer, keys))
        self.low_rank_keys[layer, :, :, start : start + keys.shape[2]] = low
        return super().update(layer, keys, values, start)

    def memory_bytes(self) -> dict[str, int]:
        held = super().memory_bytes()
        low = self.low_rank_keys
        held[low.device.type] = held.get(low.device.type, 0) + low.numel() * low.element_size()
        return held

    def scores(self, layer: int, qg: torch.Tensor, prefix_keys: torch.Tensor) -> torch.Tensor:
        low_query = torch.einsum("bkgd,kdr->bkgr", qg, self._projection(layer, qg))
        low_keys = self.low_rank_keys[layer, :, :, : prefix_keys.shape[2]].to(qg.device, qg.dtype)
        return torch.matmul(low_query, low_keys.transpose(-1, -2)) * self.scale

    def selected_logits(self, qg: torch.Tensor, prefix_keys: torch.Tensor, picked) -> torch.Tensor:
        exact = torch.einsum("bkgd,bkgsd->bkgs", qg, gather_rows(prefix_keys, picked.indices)) * self.scale
        # A masked (padding) key picked for lack of better ones stays masked.
        return exact.masked_fill(torch.isinf(picked.values), float("-inf"))
