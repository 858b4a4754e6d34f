"""Measuring a machine into a profile the planner reads: GEMM throughput by shape and dtype, collective bandwidth
and latency by group size across local processes, how much of a collective really hides behind a GEMM, and the
costs a step pays beside its GEMMs: memory bandwidth for elementwise work, and the fixed time of running a layer
and a step at all (Python, dispatch, kernel launches), measured in every process at once as training runs them.

Entry point: calibrate(processes, device) -> dict (a machine profile plus the raw measurements).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from tetra.devices import measured_gemm_flops, synchronize, timing_input
from tetra.model import ModelConfig, Transformer
from tetra.parallel.launch import end_process_group, spawn_collect

GEMM_SIZES = (512, 1024, 2048)
MESSAGE_BYTES = (1 << 20, 1 << 24)  # 1 MiB and 16 MiB


def measure_gemms(device: torch.device) -> list[dict]:
    """Square-GEMM FLOP/s for each size and dtype (best of several rounds)."""
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for size in GEMM_SIZES:
            rows.append({"dtype": str(dtype).removeprefix("torch."), "size": size,
                         "flops": measured_gemm_flops(dtype, device, size)})
    return rows


def _timed(operation, group: dist.ProcessGroup, repeats: int = 5) -> float:
    """Seconds per call; barriers on the measured group only (ranks outside it are not taking part)."""
    operation()
    dist.barrier(group=group)
    start = time.perf_counter()
    for _ in range(repeats):
        operation()
    dist.barrier(group=group)
    return (time.perf_counter() - start) / repeats


def _collective_worker(rank: int, world: int, port: int, backend: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cpu":  # as torchrun starts CPU workers (OMP_NUM_THREADS=1): one thread each
        torch.set_num_threads(1)
    rows = []
    size = 2
    while size <= world:
        group = dist.new_group(list(range(size)))
        for message in MESSAGE_BYTES:
            tensor = torch.ones(message // 4, device=device)
            pieces = [torch.empty_like(tensor) for _ in range(size)]
            if rank < size:
                reduce_s = _timed(lambda t=tensor, g=group: dist.all_reduce(t, group=g), group)
                gather_s = _timed(lambda t=tensor, p=pieces, g=group: dist.all_gather(p, t, group=g), group)
                rows.append({"group": size, "bytes": message,
                             "all_reduce_bus_bandwidth": 2 * (size - 1) / size * message / reduce_s,
                             "all_gather_bus_bandwidth": (size - 1) * message / gather_s})
            dist.barrier()
        rows.append({"group": size, "bytes": 4, "latency_s": _concurrent_latency(size, device)})
        dist.barrier()
        size *= 2
    rows.append({"group": world, "overlap_efficiency": _overlap_efficiency(device)})
    rows.append({"group": world, **_step_costs(device)})
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(rows, handle)
    end_process_group()


def _concurrent_latency(size: int, device: torch.device, calls: int = 100) -> float:
    """Seconds of an all-reduce too small to be limited by bandwidth, on groups of `size` ranks while every rank
    runs them in its own group at once (a grid's row or column groups work side by side). Each call is timed alone
    and the median kept, averaged over the measuring ranks: on processes that share cores, a few calls wait
    milliseconds for a descheduled peer and dominate a mean, where the median call is what a step's collectives
    between its computations pay (it ranks measured grids better: benchmarks/planner_accuracy.py)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    groups = [dist.new_group(list(range(first, first + size))) for first in range(0, world - size + 1, size)]
    mine = groups[rank // size] if rank // size < len(groups) else None
    seconds = 0.0
    if mine is not None:
        tiny = torch.ones(1, device=device)
        dist.all_reduce(tiny, group=mine)
        dist.barrier(group=mine)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            dist.all_reduce(tiny, group=mine)
            synchronize(device)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
    total = torch.tensor([seconds, float(mine is not None)], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return float(total[0] / total[1])


def _synchronized(operation, device: torch.device):
    def run() -> None:
        operation()
        synchronize(device)
    return run


def _overlap_efficiency(device: torch.device) -> float:
    """The share of an all-reduce over every process that hides behind a GEMM of about the same length (1: the
    step pays only the longer of the two; 0: it pays both). Collective: every rank measures, the mean is kept.
    Processes that share their cores with the collective's own threads hide little."""
    message = torch.ones(MESSAGE_BYTES[-1] // 4, device=device)
    a = timing_input(1024, 1024, device=device)
    comm_s = _timed(_synchronized(lambda: dist.all_reduce(message), device), dist.group.WORLD)
    gemm_once = _timed(_synchronized(lambda: a @ a, device), dist.group.WORLD)
    count = torch.tensor([max(1.0, round(comm_s / gemm_once))])
    dist.all_reduce(count, op=dist.ReduceOp.MAX)  # the same GEMM work on every rank
    gemms = int(count)

    def compute() -> None:
        for _ in range(gemms):
            a @ a

    def both() -> None:
        work = dist.all_reduce(message, async_op=True)
        compute()
        work.wait()

    gemm_s = _timed(_synchronized(compute, device), dist.group.WORLD)
    both_s = _timed(_synchronized(both, device), dist.group.WORLD)
    hidden = (gemm_s + comm_s - both_s) / min(gemm_s, comm_s)
    mean = torch.tensor([min(max(hidden, 0.0), 1.0)])
    dist.all_reduce(mean)
    return float(mean) / dist.get_world_size()


def _memory_bandwidth(device: torch.device) -> float:
    """Bytes/s of an elementwise kernel streaming tensors far larger than any cache (c = a + b: three passes)."""
    a, b = (torch.ones(1 << 23, device=device) for _ in range(2))
    c = torch.empty_like(a)
    seconds = _timed(_synchronized(lambda: torch.add(a, b, out=c), device), dist.group.WORLD, repeats=10)
    return 3 * a.numel() * a.element_size() / seconds


def _tiny_step_seconds(layers: int, device: torch.device) -> float:
    """One training step of a model too small for its arithmetic to matter: what is left is the fixed cost of
    running its layers, loss and optimizer (best of several rounds)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=32, hidden_size=16, n_layers=layers, n_heads=2,
                                    max_position_embeddings=8)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
    tokens = torch.randint(0, 32, (1, 5), device=device)

    def step() -> None:
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return min(_timed(_synchronized(step, device), dist.group.WORLD, repeats=10) for _ in range(3))


def _concurrent_gemm_flops(dtype: torch.dtype, device: torch.device, size: int = 1024) -> float:
    """FLOP/s of one process's GEMMs while every process runs them (on a CPU, processes share the cores)."""
    a = timing_input(size, size, dtype=dtype, device=device)
    return 2 * size**3 / _timed(_synchronized(lambda: a @ a, device), dist.group.WORLD, repeats=10)


def _step_costs(device: torch.device) -> dict[str, float]:
    """GEMM throughput, memory bandwidth and the fixed costs per layer and per step, each the mean over every
    process measuring at the same time (processes that share cores slow each other, as in training)."""
    one, three = _tiny_step_seconds(1, device), _tiny_step_seconds(3, device)
    layer = max((three - one) / 2, 0.0)
    values = torch.tensor([_memory_bandwidth(device), layer, max(one - layer, 0.0),
                           _concurrent_gemm_flops(torch.float32, device),
                           _concurrent_gemm_flops(torch.bfloat16, device)], dtype=torch.float64)
    dist.all_reduce(values)
    bandwidth, layer, step, fp32, bf16 = (values / dist.get_world_size()).tolist()
    return {"memory_bandwidth": bandwidth, "layer_overhead": layer, "step_overhead": step,
            "concurrent_gemm_flops_float32": fp32, "concurrent_gemm_flops_bfloat16": bf16}


def measure_collectives(processes: int, backend: str) -> list[dict]:
    """Bus bandwidth (bytes/s per rank, ring-normalized) of all-reduce and all-gather for groups of 2, 4, ..."""
    return spawn_collect(_collective_worker, processes, backend)


def _costs_worker(rank: int, world: int, port: int, device_type: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    costs = _step_costs(torch.device(device_type))
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(costs, handle)
    end_process_group()


def _single_process_costs(device: torch.device) -> dict[str, float]:
    """_step_costs in one spawned process (its timings synchronize through a group of one)."""
    return spawn_collect(_costs_worker, 1, device.type)


def calibrate(processes: int, device: torch.device, name: str = "local") -> dict:
    """A machine profile of this node: the best measured bf16 GEMM, and the bandwidth of the largest local group.
    The inter-node figure cannot be measured on one node; it is set equal to the intra-node one (edit it)."""
    gemms = measure_gemms(device)
    collectives = measure_collectives(processes, "nccl" if device.type == "cuda" else "gloo") if processes > 1 else []
    best_gemm = max(row["flops"] for row in gemms if row["dtype"] == "bfloat16")
    largest = [row for row in collectives if row["group"] == max((r["group"] for r in collectives), default=0)]
    bandwidth = max((row["all_reduce_bus_bandwidth"] for row in largest if "all_reduce_bus_bandwidth" in row),
                    default=0.0)
    latency = min((row["latency_s"] for row in largest if "latency_s" in row), default=20e-6)
    latency_by_group = [[row["group"], row["latency_s"]] for row in collectives if "latency_s" in row]
    efficiency = next((row["overlap_efficiency"] for row in collectives if "overlap_efficiency" in row), 1.0)
    costs = next((row for row in collectives if "layer_overhead" in row), None)
    if costs is None:  # one process: no worker group was started; measure here
        costs = _single_process_costs(device)
    if device.type == "cuda":
        memory_gb = torch.cuda.get_device_properties(device).total_memory / 1e9
    else:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9 / max(processes, 1)
    # What one process sustains while all of them compute (on a CPU they share the cores; on GPUs it is the
    # single-device figure again): what training on this many processes gets.
    sustained = min(best_gemm, costs["concurrent_gemm_flops_bfloat16"])
    profile = {"name": name, "devices_per_node": processes, "memory_gb": round(memory_gb, 1),
               "peak_flops": best_gemm, "gemm_flops": sustained, "intra_node_bandwidth": bandwidth,
               "inter_node_bandwidth": bandwidth, "collective_latency": latency,
               "collective_latency_by_group": latency_by_group,
               "overlap_efficiency": round(efficiency, 3), "memory_bandwidth": costs["memory_bandwidth"],
               "layer_overhead": costs["layer_overhead"], "step_overhead": costs["step_overhead"]}
    return {"profile": profile, "gemm": gemms, "collectives": collectives, "step_costs": costs}
