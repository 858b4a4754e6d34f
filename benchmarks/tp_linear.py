"""tetra's TensorParallelLinear against AxoNN 0.2.0's intra_layer.Linear on one MLP (H -> 4H -> H, no bias), the same
processes timing both, interleaved: forward + backward + the weight gradients' depth sum, overlap on for both.

Run: pip install axonn==0.2.0 (or `make peers`), then
     python benchmarks/tp_linear.py [--hidden 1024 --tokens 1024 --world 2 --repeats 20]
Each decomposition (row, column, depth; world-way each) runs in fresh gloo processes of one thread. Both libraries
start from the same full weights and inputs; their outputs and weight gradients on every rank are checked equal
before timing. Ratio = AxoNN ms / tetra ms (> 1: tetra faster).

AxoNN targets CUDA and NCCL; on CPU its hard-coded device calls are redirected at run time (see axonn_on_cpu): its
process groups are made with the default (gloo) backend, its 'cuda' tensors are made on the CPU, and its end-of-step
torch.cuda.synchronize (which on a GPU waits for its overlapped collectives) waits for those collectives' handles.
Its layer code runs unchanged. Expert mode is used on both sides: the input is this rank's in-feature chunk of its
tokens, with no batch re-distribution around each layer.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from tetra.parallel.grid import GridShape, ProcessGrid
from tetra.parallel.launch import end_process_group, spawn_collect
from tetra.parallel.overlap import CommSchedule
from tetra.parallel.tensor_parallel import TensorParallelLinear


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of the whole batch (split over depth)")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per library")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dims", default="row,col,depth")
    return parser.parse_args()


def axonn_on_cpu(world: int) -> None:
    """Point AxoNN 0.2.0's CUDA/NCCL calls at the CPU and gloo, in this process only."""
    import axonn.intra_layer.communication as axonn_comm
    import axonn.intra_layer.fully_connected as axonn_fc
    import axonn.intra_layer.overlap_communication as axonn_overlap

    new_group = dist.new_group

    def gloo_group(*args, **kwargs):
        kwargs.pop("backend", None)
        return new_group(*args, **kwargs)

    dist.new_group = gloo_group
    torch.cuda.set_device = lambda device: None
    torch.cuda.device_count = lambda: world
    torch.cuda.current_device = lambda: "cpu"

    initialize = axonn_fc.initialize_params

    def initialize_on_cpu(*args, **kwargs):
        kwargs["init_device"] = "cpu"
        return initialize(*args, **kwargs)

    axonn_fc.initialize_params = initialize_on_cpu

    # gloo's all_gather_into_tensor writes through views of the output that autograd refuses when AxoNN starts the
    # gather inside a layer's forward (no_grad); the same collective as a list all-gather into the output's chunks:
    def all_gather_made_in_grad_mode(output, source, group=None, async_op=False):
        with torch.enable_grad():
            pieces = list(output.chunk(dist.get_world_size(group)))
        return dist.all_gather(pieces, source, group=group, async_op=async_op)

    dist.all_gather_into_tensor = all_gather_made_in_grad_mode

    def wait_for_handles() -> None:
        for handle in axonn_overlap.handles:
            if handle is not None:
                handle.wait()
        axonn_overlap.handles = []

    axonn_overlap.clear_handles = wait_for_handles
    assert axonn_comm.overlap_communication is axonn_overlap


class TetraMLP(nn.Module):
    def __init__(self, first: nn.Linear, second: nn.Linear, grid: ProcessGrid) -> None:
        super().__init__()
        self.schedule = CommSchedule(overlap=True)
        self.up = TensorParallelLinear(first, grid, transposed=False, schedule=self.schedule)
        self.down = TensorParallelLinear(second, grid, transposed=True, schedule=self.schedule)
        self.schedule.set_forward_order([self.up, self.down])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))

    def step(self, x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
        y = self(x)
        y.backward(grad_y)
        self.schedule.finish()  # the depth reduce-scatters of the weight gradients
        return y


class AxonnMLP(nn.Module):
    def __init__(self, first: nn.Linear, second: nn.Linear) -> None:
        super().__init__()
        from axonn.intra_layer import Linear

        hidden, inner = first.in_features, first.out_features
        self.up = Linear(hidden, inner, bias=False, expert_mode=True)
        self.down = Linear(inner, hidden, bias=False, transpose=True, expert_mode=True)
        self.up.load_state_dict({"weight": first.weight.detach()})  # AxoNN shards a full matrix itself
        self.down.load_state_dict({"weight": second.weight.detach()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))

    def step(self, x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
        from axonn.intra_layer import optimize_communication

        with optimize_communication(overlap_all_reduce=True, overlap_reduce_scatter=True, overlap_all_gather=True,
                                    model_object_for_overlapping_allgathers=self):
            y = self(x)
            y.backward(grad_y)
        return y  # leaving the context waited for the reduce-scatters and added them to .grad


def local_input(tensor: torch.Tensor, grid: ProcessGrid, features: str) -> torch.Tensor:
    """This rank's tokens (split over depth) and its chunk of the features (split over the `features` group)."""
    tokens = tensor.chunk(grid.size("depth"))[grid.index("depth")]
    return tokens.chunk(grid.size(features), dim=-1)[grid.index(features)].contiguous()


def timed(step, x: torch.Tensor, grad_y: torch.Tensor, model: nn.Module) -> float:
    dist.barrier()
    start = time.perf_counter()
    step(x, grad_y)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def worker(rank: int, world: int, port: int, args: argparse.Namespace, dim: str, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sizes = {"data": 1, "depth": 1, "row": 1, "col": 1, dim: world}
    grid = ProcessGrid.build(GridShape(**sizes))
    axonn_on_cpu(world)
    import axonn.axonn as ax

    ax.init(G_inter=1, G_data=1, G_intra_r=sizes["row"], G_intra_c=sizes["col"], G_intra_d=sizes["depth"],
            gpus_per_node=world)
    torch.manual_seed(0)
    hidden = args.hidden
    first, second = nn.Linear(hidden, 4 * hidden, bias=False), nn.Linear(4 * hidden, hidden, bias=False)
    x_full, grad_full = torch.randn(args.tokens, hidden), torch.randn(args.tokens, hidden)
    tetra_mlp, axonn_mlp = TetraMLP(first, second, grid), AxonnMLP(first, second)
    # Input: in-features over the column group; output: the second layer's out-features, also over columns.
    x, grad_y = local_input(x_full, grid, "col"), local_input(grad_full, grid, "col")

    # Same computation: equal outputs and weight-gradient shards on every rank.
    y_tetra, y_axonn = tetra_mlp.step(x, grad_y), axonn_mlp.step(x, grad_y)
    checks = [torch.allclose(y_tetra, y_axonn, rtol=1e-4, atol=1e-4)]
    for ours, theirs in ((tetra_mlp.up, axonn_mlp.up), (tetra_mlp.down, axonn_mlp.down)):
        checks.append(torch.allclose(ours.weight.grad.reshape(-1), theirs.weight.grad.reshape(-1), rtol=1e-3,
                                     atol=1e-3))
    equal = torch.tensor(float(all(checks)))
    dist.all_reduce(equal, op=dist.ReduceOp.MIN)
    tetra_mlp.zero_grad(set_to_none=True)
    axonn_mlp.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"tetra": [], "axonn": []}
    for repeat in range(args.warmup + args.repeats):
        pair = [("tetra", tetra_mlp), ("axonn", axonn_mlp)]
        for name, model in pair if repeat % 2 == 0 else pair[::-1]:
            seconds = timed(model.step, x, grad_y, model)
            if repeat >= args.warmup:
                times[name].append(seconds)
    medians = torch.tensor([statistics.median(times["tetra"]), statistics.median(times["axonn"])])
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)  # the slower rank sets the pace
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump({"dim": dim, "tetra_ms": 1000 * float(medians[0]), "axonn_ms": 1000 * float(medians[1]),
                       "equal": bool(equal)}, handle)
    end_process_group()


def main() -> None:
    args = parse_args()
    print(f"MLP {args.hidden} -> {4 * args.hidden} -> {args.hidden}, {args.tokens} tokens, {args.world} gloo "
          f"processes of one thread on {os.cpu_count()} cores; forward + backward + depth gradient sum, overlap on")
    print(f"{'split':<8} {'tetra ms':>9} {'AxoNN ms':>9} {'AxoNN/tetra':>12}  same result")
    for dim in args.dims.split(","):
        row = spawn_collect(worker, args.world, args, dim)
        print(f"{dim:<8} {row['tetra_ms']:>9.1f} {row['axonn_ms']:>9.1f} {row['axonn_ms'] / row['tetra_ms']:>11.2f}x  "
              f"{'yes' if row['equal'] else 'NO'}", flush=True)


if __name__ == "__main__":
    main()
