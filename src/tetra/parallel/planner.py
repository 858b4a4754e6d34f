"""The performance model: predicted step time (compute + each collective) and memory per device for every valid
grid, from a machine profile. Follows SPECS section 1 (ring costs per GEMM), with compute included.

Entry points: MachineProfile.load(name_or_path), valid_grids(...), predict(...), plan(...).
With overlap, each group's collectives hide behind the computation they can run beside (Prediction.exposed).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from tetra.errors import ConfigError
from tetra.model.config import ModelConfig
from tetra.parallel.grid import GridShape, check_grid
from tetra.parallel.overlap import BUCKET_BYTES

MACHINES = Path(__file__).with_name("machines")
# Bytes per value: activations and weights move in bf16; gradients are reduced in fp32 (master precision).
ACTIVATION_BYTES, GRADIENT_BYTES, MASTER_BYTES = 2, 4, 4


@dataclass(frozen=True)
class MachineProfile:
    """What the model needs to know about a machine (shipped TOML files document their sources)."""

    name: str
    devices_per_node: int
    memory_gb: float
    peak_flops: float
    gemm_flops: float  # sustained matrix-multiply FLOP/s of one device
    intra_node_bandwidth: float  # bytes/s per device per direction inside a node
    inter_node_bandwidth: float  # bytes/s per device per direction across nodes
    # Seconds a collective costs even when tiny (launch and synchronization: the alpha of the alpha-beta model).
    # Shipped GPU profiles keep this default (NCCL small-message all-reduce inside a node is ~10-30 us);
    # `tetra calibrate` measures it.
    collective_latency: float = 20e-6
    # Measured latency by group size, as (ranks, seconds) pairs: a tiny all-reduce on groups of that size while every
    # rank runs one in its own group at once, as a grid's groups do. Sizes not measured scale by (ranks - 1) from
    # the nearest measured size below (a ring takes 2 (ranks - 1) steps). Empty: collective_latency for any group.
    # On oversubscribed CPUs the size matters: a group of 4 processes on 2 cores waits about 3x as long as a pair.
    collective_latency_by_group: tuple[tuple[int, float], ...] = ()
    # Share of a collective that can hide behind computation when they overlap. GPUs run collectives on their own
    # streams and links, so shipped profiles keep 1.0; processes that share CPU cores with gloo's threads hide far
    # less. `tetra calibrate` measures it (an all-reduce beside a GEMM of the same length).
    overlap_efficiency: float = 1.0
    # Beside the GEMMs a step streams activations through elementwise kernels (norms, residual adds, rotary,
    # activation functions, the loss's softmax) and the optimizer through its state: bytes/s of one device's memory
    # (0: not modelled). Shipped GPU profiles give the HBM datasheet figure; `tetra calibrate` measures it.
    memory_bandwidth: float = 0.0
    # Fixed seconds of running one layer's forward and backward once, and of a step's embedding, loss and optimizer
    # beyond their arithmetic (Python, dispatch, kernel launches). On GPUs they overlap the device's work and the
    # shipped profiles keep 0; on CPUs they are paid in full and `tetra calibrate` measures them.
    layer_overhead: float = 0.0
    step_overhead: float = 0.0

    @classmethod
    def load(cls, name_or_path: str) -> MachineProfile:
        path = Path(name_or_path)
        if not path.is_file():
            path = MACHINES / f"{name_or_path}.toml"
        if not path.is_file():
            shipped = ", ".join(sorted(p.stem for p in MACHINES.glob("*.toml")))
            raise ConfigError(f"No machine profile {name_or_path!r}: pass a TOML file or one of: {shipped}.")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path} is not valid TOML: {error}.") from None
        known = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(values))
        if missing:
            raise ConfigError(f"{path} is not a machine profile: it lacks {', '.join(missing)}.")
        # Other tables (raw measurements) are kept in the file for people.
        try:
            return cls(**{key: values[key] for key in known if key in values})
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: collective_latency_by_group must be a list of [ranks, seconds] pairs, "
                              "e.g. [[2, 3e-4], [4, 1e-3]].") from None

    def __post_init__(self) -> None:
        # TOML and `tetra calibrate` give lists of lists; kept as sorted (ranks, seconds) tuples
        pairs = sorted((int(size), float(seconds)) for size, seconds in self.collective_latency_by_group)
        object.__setattr__(self, "collective_latency_by_group", tuple(pairs))

    def latency(self, ranks: int) -> float:
        """Seconds one collective call on a group of `ranks` costs even when tiny."""
        measured = self.collective_latency_by_group
        if not measured:
            return self.collective_latency
        below = [pair for pair in measured if pair[0] <= ranks] or list(measured[:1])
        size, seconds = below[-1]
        return seconds if size == ranks else seconds * (ranks - 1) / max(size - 1, 1)


@dataclass(frozen=True)
class Gemm:
    """One weight matrix of the model: `out x in`, normal (out over rows) or transposed (out over columns)."""

    name: str
    in_features: int
    out_features: int
    transposed: bool
    per_model: int = 1  # how many such matrices the model has
    calls: int = 1  # separate Linear layers it stands for (q, k and v are three), each with its own collectives


def model_gemms(config: ModelConfig) -> list[Gemm]:
    hidden, heads = config.hidden_size, config.n_heads * config.resolved_head_dim
    kv = config.kv_heads * config.resolved_head_dim
    mlp_out = config.mlp_width * (2 if config.gated_mlp else 1)
    layers = config.n_layers
    return [Gemm("qkv", hidden, heads + 2 * kv, False, layers, 3), Gemm("o", heads, hidden, True, layers),
            Gemm("mlp_up", hidden, mlp_out, False, layers, 2 if config.gated_mlp else 1),
            Gemm("mlp_down", config.mlp_width, hidden, True, layers),
            Gemm("head", hidden, config.vocab_size, False, 1)]


# The weight matrices whose forward activation checkpointing runs again in backward.
RECOMPUTED = {"none": (), "block": ("qkv", "o", "mlp_up", "mlp_down"), "attention": ("qkv", "o"),
              "mlp": ("mlp_up", "mlp_down")}


def _ring_all_reduce(size: int) -> float:
    return 2 * (size - 1) / size


def _ring_gather(size: int) -> float:
    return (size - 1) / size


def group_bandwidth(machine: MachineProfile, shape: GridShape, dimension: str) -> float:
    """Column ranks are neighbours, then rows, depth, data: a group inside one node gets the node's links."""
    stride = {"col": 1, "row": shape.col, "depth": shape.col * shape.row,
              "data": shape.col * shape.row * shape.depth}[dimension]
    span = stride * getattr(shape, dimension)
    return machine.intra_node_bandwidth if span <= machine.devices_per_node else machine.inter_node_bandwidth


@dataclass
class Prediction:
    """Predicted seconds per optimizer step, by part, and bytes of memory per device."""

    shape: GridShape
    compute: float = 0.0
    collectives: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("col", "row", "depth", "data"), 0.0))
    memory: dict[str, float] = field(default_factory=dict)
    fits: bool = True
    # With overlapped collectives (parallel.overlap): the part of each group's time that can run in the background,
    # and the computation it can hide behind.
    overlappable: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("col", "row", "depth", "data"), 0.0))
    windows: dict[str, float] = field(default_factory=lambda: dict.fromkeys(("col", "row", "depth", "data"), 0.0))
    overlap: bool = True
    overlap_efficiency: float = 1.0  # the machine's (MachineProfile.overlap_efficiency)
    regather: bool = False  # depth blocks gathered again in backward (parallel.regather) rather than kept
    recompute: str = "none"  # activations recomputed in backward: none | block | attention | mlp
    frozen: bool = False  # LoRA fine-tuning: the base is frozen (bf16, no gradients, no optimizer state)
    elementwise: float = 0.0  # memory-bound work: activations through non-GEMM kernels, the optimizer's state
    overhead: float = 0.0  # fixed costs of running layers and the step (MachineProfile.layer_overhead, step_overhead)

    def exposed(self, dimension: str) -> float:
        """Seconds of this group's collectives that the step waits for."""
        total = self.collectives[dimension]
        if not self.overlap:
            return total
        hidden = min(self.overlappable[dimension], self.windows[dimension]) * self.overlap_efficiency
        return total - hidden

    @property
    def step_time(self) -> float:
        return self.compute + self.elementwise + self.overhead + sum(self.exposed(name) for name in self.collectives)


def _add_calls(prediction: Prediction, dimension: str, calls: float, machine: MachineProfile) -> None:
    """The fixed cost of `calls` collectives on a group (none when the group is a single rank)."""
    ranks = getattr(prediction.shape, dimension)
    if ranks > 1:
        prediction.collectives[dimension] += calls * machine.latency(ranks)


def _add_gemm(prediction: Prediction, gemm: Gemm, tokens: float, micro_steps: int, machine: MachineProfile,
              value_bytes: int) -> None:
    shape = prediction.shape
    out_dim, in_dim = ("col", "row") if gemm.transposed else ("row", "col")
    out_split, in_split = getattr(shape, out_dim), getattr(shape, in_dim)
    block = gemm.in_features * gemm.out_features / (shape.row * shape.col)
    local_tokens = tokens / (shape.data * shape.depth)
    n = gemm.per_model
    frozen = prediction.frozen  # LoRA: no weight-gradient GEMM, no weight gradient to reduce
    forward_seconds = n * 2 * local_tokens * block / machine.gemm_flops
    gemm_seconds = forward_seconds * (2 if frozen else 3)
    prediction.compute += gemm_seconds
    bandwidth = {name: group_bandwidth(machine, shape, name) for name in ("col", "row", "depth", "data")}
    # Output partials summed over the in-feature group (the next operation needs them: never hidden); input
    # gradients over the out-feature group, which overlap the weight-gradient GEMM (a third of the GEMM time).
    output_sum = n * _ring_all_reduce(in_split) * local_tokens * gemm.out_features / out_split * value_bytes \
        / bandwidth[in_dim]
    recomputed = gemm.name in RECOMPUTED[prediction.recompute]
    forwards = 2 if recomputed else 1  # a recomputed forward runs again in backward, with its output sums
    prediction.compute += (forwards - 1) * forward_seconds
    prediction.collectives[in_dim] += forwards * output_sum
    _add_calls(prediction, in_dim, forwards * n * gemm.calls * micro_steps, machine)
    input_gradient = n * _ring_all_reduce(out_split) * local_tokens * gemm.in_features / in_split * value_bytes \
        / bandwidth[out_dim]
    prediction.collectives[out_dim] += input_gradient
    _add_calls(prediction, out_dim, n * gemm.calls * micro_steps, machine)
    prediction.overlappable[out_dim] += input_gradient
    prediction.windows[out_dim] += 0.0 if frozen else forward_seconds
    # The weight block is gathered over depth in forward (again in backward with regather or recomputation; fp32,
    # or bf16 for a frozen LoRA base) and its gradient reduce-scattered: gathers prefetched one layer ahead,
    # reduce-scatters finished in the background, behind this layer's GEMMs.
    gathers = 2 if prediction.regather or recomputed else 1
    weight_bytes, scatter_bytes = (ACTIVATION_BYTES, 0) if frozen else (MASTER_BYTES, GRADIENT_BYTES)
    depth = n * micro_steps * _ring_gather(shape.depth) * block * (gathers * weight_bytes + scatter_bytes) \
        / bandwidth["depth"]
    prediction.collectives["depth"] += depth
    _add_calls(prediction, "depth", (gathers + (0 if frozen else 1)) * n * gemm.calls * micro_steps, machine)
    prediction.overlappable["depth"] += depth
    prediction.windows["depth"] += gemm_seconds
    # The data all-reduce happens once per optimizer step, in buckets during the last backward (two thirds of the
    # last micro-batch's GEMMs), except the last bucket. A frozen base has no gradient to sum.
    if not frozen:
        data = n * _ring_all_reduce(shape.data) * block / shape.depth * GRADIENT_BYTES / bandwidth["data"]
        prediction.collectives["data"] += data
        prediction.overlappable["data"] += data
        prediction.windows["data"] += 2 * gemm_seconds / 3 / micro_steps


def predict(config: ModelConfig, shape: GridShape, global_batch: int, seq_len: int, machine: MachineProfile,
            zero1: bool = False, micro_batch: int = 1, value_bytes: int = ACTIVATION_BYTES,
            overlap: bool = True, regather: bool = False, recompute: str = "none",
            finetune: str = "full") -> Prediction:
    """Step time and memory per device of one grid (bf16 compute, fp32 master weights and AdamW state); each batch
    rank runs its share as micro-batches of `micro_batch` sequences (gradient accumulation). value_bytes is the
    width of activations and gathered weights: 2 for bf16 training, 4 for fp32. recompute: what activation
    checkpointing recomputes (train.activation_checkpointing). finetune = "lora": a frozen base in bf16 with
    adapters (whose few parameters are not counted), no weight gradients to compute or reduce."""
    prediction = Prediction(shape, overlap=overlap, overlap_efficiency=machine.overlap_efficiency, regather=regather,
                            recompute=recompute, frozen=finetune == "lora")
    tokens = global_batch * seq_len
    micro_steps = max(global_batch // (shape.data * shape.depth * micro_batch), 1)
    for gemm in model_gemms(config):
        _add_gemm(prediction, gemm, tokens, micro_steps, machine, value_bytes)
    # Calls outside the Linear layers: two norms per layer (statistics summed over columns, forward and backward),
    # the vocabulary-parallel embedding and loss (four sums over rows), data buckets once per step.
    _add_calls(prediction, "col", micro_steps * (4 * config.n_layers + 2), machine)
    _add_calls(prediction, "row", micro_steps * 4, machine)
    gradient_bytes = GRADIENT_BYTES * config.num_parameters() / (shape.row * shape.col * shape.depth)
    _add_calls(prediction, "data", max(1, math.ceil(gradient_bytes / BUCKET_BYTES)), machine)
    if not config.tie_embeddings:  # the embedding table is depth-sharded too (a tied one is the head's weight)
        table = config.vocab_size * config.hidden_size / (shape.row * shape.col)
        prediction.collectives["depth"] += micro_steps * _ring_gather(shape.depth) * table \
            * (MASTER_BYTES + GRADIENT_BYTES) / group_bandwidth(machine, shape, "depth")
        _add_calls(prediction, "depth", 2 * micro_steps, machine)
    local_tokens = tokens / (shape.data * shape.depth)
    attention_width = config.n_heads * config.resolved_head_dim / shape.row
    attention_passes = 4 if recompute in ("block", "attention") else 3  # a recomputed forward runs twice
    prediction.compute += config.n_layers * attention_passes * 4 * local_tokens * seq_len * attention_width \
        / machine.gemm_flops
    parameters = config.num_parameters() / (shape.row * shape.col * shape.depth)
    _add_step_costs(prediction, config, local_tokens, micro_steps, parameters / (shape.data if zero1 else 1),
                    machine, value_bytes)
    micro_tokens = local_tokens / micro_steps
    kept, transient = activation_bytes(recompute, shape.row * shape.col)
    # activation_bytes counts bf16 values; fp32 training (value_bytes = 4) keeps twice the bytes
    activations = (config.n_layers * kept + transient) * micro_tokens * config.hidden_size * value_bytes \
        / ACTIVATION_BYTES
    activations += micro_tokens * config.vocab_size / shape.row * 4  # the fp32 logits of the local vocabulary
    trained = 0 if prediction.frozen else 1
    prediction.memory = {"parameters": (2 if prediction.frozen else 4) * parameters,
                         "gradients": 4 * parameters * trained,
                         "optimizer": 8 * parameters * trained / (shape.data if zero1 else 1),
                         # the data-parallel sums run on flat copies of the gradients (buckets), all in flight at
                         # the end of backward (ZeRO-1's reduce-scatter likewise)
                         "gradient_buckets": 4 * parameters * trained if shape.data > 1 else 0.0,
                         "activations": activations,
                         "gathered_weights": _gathered_weight_bytes(config, shape, regather, value_bytes)}
    prediction.fits = sum(prediction.memory.values()) <= 0.9 * machine.memory_gb * 1e9
    return prediction


def _add_step_costs(prediction: Prediction, config: ModelConfig, local_tokens: float, micro_steps: int,
                    updated_parameters: float, machine: MachineProfile, value_bytes: int) -> None:
    """What a step costs beside GEMMs and collectives. Values each token streams through elementwise kernels per
    layer, forward (backward about twice that): two norms and two residual adds on the column-split hidden state
    (~10 passes), rotary and the head reshapes on the row-split attention width (~4 passes of q and k, 2 of q, k,
    v and the output), the activation on the row-split MLP width (gated ~5 passes, else ~2); a recomputed part runs
    its forward again. The loss reads and writes the local vocabulary ~6 times in fp32; fused AdamW reads and
    writes its shard of parameters, gradients and both moments (~36 bytes per parameter with clipping and
    zeroing). Plus the machine's fixed cost per layer and micro-step and per step."""
    shape = prediction.shape
    head_dim = config.resolved_head_dim
    q, kv = config.n_heads * head_dim / shape.row, config.kv_heads * head_dim / shape.row
    attention = 4 * (q + kv) + 2 * (2 * q + 2 * kv)
    mlp = (5 if config.gated_mlp else 2) * config.mlp_width / shape.row
    hidden = 10 * config.hidden_size / shape.col
    recomputed = {"block": hidden + attention + mlp, "attention": attention, "mlp": mlp, "none": 0.0}
    layer_bytes = (3 * (hidden + attention + mlp) + recomputed[prediction.recompute]) * value_bytes
    loss_bytes = 6 * config.vocab_size / shape.row * 4
    optimizer_bytes = 0.0 if prediction.frozen else 36 * updated_parameters
    if machine.memory_bandwidth > 0:
        prediction.elementwise = (local_tokens * (config.n_layers * layer_bytes + loss_bytes) + optimizer_bytes) \
            / machine.memory_bandwidth
    prediction.overhead = micro_steps * config.n_layers * machine.layer_overhead + machine.step_overhead


def activation_bytes(recompute: str, tensor_parallel: int) -> tuple[float, float]:
    """Bytes per token and hidden unit a layer keeps for backward, and those one layer holds only while it is
    recomputed. Korthikanti et al. 2022 (bf16, attention scores not kept, as with flash attention): 10 + 24/t in
    all, 5 + 8/t of it in the attention part and 5 + 16/t in the MLP; a recomputed part keeps only its input (2)."""
    attention, mlp = 5 + 8 / tensor_parallel, 5 + 16 / tensor_parallel
    if recompute == "block":
        return 2.0, attention + mlp
    if recompute == "attention":
        return 2 + mlp, attention
    if recompute == "mlp":
        return attention + 2, mlp
    return attention + mlp, 0.0


def _gathered_weight_bytes(config: ModelConfig, shape: GridShape, regather: bool, value_bytes: int) -> float:
    """Whole weight blocks held during a step beyond the depth shards: with regather, the block in use and the
    prefetched one (fp32); kept, every layer's block in the compute dtype. A tied head keeps its table either way."""
    if shape.depth == 1:
        return 0.0
    blocks = [gemm.in_features * gemm.out_features / (shape.row * shape.col) for gemm in model_gemms(config)]
    kept = 2 * max(blocks) * MASTER_BYTES if regather else \
        sum(block * gemm.per_model for block, gemm in zip(blocks, model_gemms(config), strict=True)) * value_bytes
    if config.tie_embeddings:
        kept += config.vocab_size * config.hidden_size / (shape.row * shape.col) * value_bytes
    return kept


def valid_grids(config: ModelConfig, devices: int, global_batch: int, micro_batch: int = 1) -> list[GridShape]:
    """Every (data, depth, row, col) with the right product that splits the model and the batch evenly."""
    shapes = []
    divisors = [d for d in range(1, devices + 1) if devices % d == 0]
    for data, depth, row, col in itertools.product(divisors, repeat=4):
        shape = GridShape(data, depth, row, col)
        if shape.world != devices or global_batch % (data * depth * micro_batch):
            continue
        try:
            check_grid(shape, config)
        except ConfigError:
            continue
        shapes.append(shape)
    return shapes


def plan(config: ModelConfig, devices: int, global_batch: int, seq_len: int, machine: MachineProfile,
         zero1: bool = False, micro_batch: int = 1, overlap: bool = True, regather: bool = False,
         recompute: str = "none", finetune: str = "full", value_bytes: int = ACTIVATION_BYTES) -> list[Prediction]:
    """Valid grids ranked: those that fit in memory first, each group by predicted step time."""
    grids = valid_grids(config, devices, global_batch, micro_batch)
    if not grids:
        raise ConfigError(f"No grid of {devices} devices splits this model and a global batch of {global_batch} "
                          f"(micro-batches of {micro_batch}): the sizes it splits (hidden, heads, KV heads, MLP width, "
                          "vocabulary) and the batch must divide by the grid's dimensions.")
    predictions = [predict(config, shape, global_batch, seq_len, machine, zero1, micro_batch, overlap=overlap,
                           regather=regather, recompute=recompute, finetune=finetune, value_bytes=value_bytes)
                   for shape in grids]
    return sorted(predictions, key=lambda p: (not p.fits, p.step_time))
