"""Peak memory per rank while loading a Hugging Face folder, training 3 steps and saving, for 1, 2 and 4 ranks on
depth, row x col and data x depth grids, against the planner's prediction (tetra.parallel.planner.predict).

Run: python benchmarks/memory_scaling.py [--layers 12 --width 1024 --grids 1 depth=2 row=2 data=2 depth=4 ...]
The limit run: --layers 16 --width 2048 --grids row=2,col=2 1 --allocators return --data-limit-mib 7000
Each grid is one `torchrun` of this script (--worker): every rank notes its resident memory before tetra builds
anything, then the peak (ru_maxrss) once the model is loaded onto the grid (meta device, sliced reads) and once
training, the final checkpoint and the streamed Hugging Face export are done. The table prints the growth over that
baseline per rank, the planner's sum (fp32 weights, gradients, AdamW state, activations, gathered depth blocks,
gradient buckets), and the ratio. On a GPU (--device cuda) the same runs report torch.cuda.max_memory_allocated instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GRIDS = ["1", "depth=2", "row=2", "data=2", "depth=4", "row=2,col=2", "data=2,depth=2"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4096, help="the tokenizer trained on the stdlib corpus")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--grids", nargs="+", default=GRIDS, help="1, or NAME=N[,NAME=N] over data/depth/row/col")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--allocators", nargs="+", default=["return", "default"], choices=["return", "default"],
                        help="glibc policies to run each grid under (see the table's header)")
    parser.add_argument("--data-limit-mib", type=int, default=0,
                        help="enforce this data-size limit (RLIMIT_DATA) on every process: a grid that does not fit "
                             "prints tetra's out-of-memory paragraph instead of its peaks")
    parser.add_argument("--scratch", default=None, help="folder for data, model and runs (default: a temp folder)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args()


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(args: argparse.Namespace) -> None:
    """One rank: train as the config says, noting the peaks after loading and at the end."""
    import torch.distributed as dist

    from tetra.config import load_run_config
    from tetra.errors import TetraError
    from tetra.train import trainer

    baseline = resident_bytes() if not args.device.startswith("cuda") else 0
    config, explicit = load_run_config(args.config)
    loaded: dict[str, int] = {}
    build_loop = trainer.build_loop

    def noting_build_loop(*arguments, **keywords):
        result = build_loop(*arguments, **keywords)
        loaded["peak"] = peak_bytes(args.device)
        return result

    trainer.build_loop = noting_build_loop  # a measurement hook for this script only
    try:
        trainer.train(config, explicit, show_progress=False)
    except TetraError as error:  # as the CLI reports it (the out-of-memory paragraph)
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None
    row = {"rank": dist.get_rank() if dist.is_initialized() else 0, "baseline": baseline,
           "after_load": loaded["peak"] - baseline, "after_train_and_save": peak_bytes(args.device) - baseline}
    Path(f"{args.out}.{row['rank']}").write_text(json.dumps(row))


def _sizes(grid: str) -> dict[str, int]:
    if grid == "1":
        return {}
    return {name: int(value) for name, value in (part.split("=") for part in grid.split(","))}


def _prepare(scratch: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The stdlib corpus tokenized, and a random Llama-shaped model saved as a Hugging Face folder (built in a
    child process, so this one stays small)."""
    data, model = scratch / "data", scratch / "hf"
    tetra = [sys.executable, "-m", "tetra"]
    if not data.exists():
        subprocess.run([*tetra, "tokenizer", "train", "stdlib", "--vocab-size", str(args.vocab), "--out",
                        str(scratch / "tokenizer"), "--overwrite"], check=True, capture_output=True)
        subprocess.run([*tetra, "data", "prepare", "stdlib", "--tokenizer", str(scratch / "tokenizer"), "--out",
                        str(data), "--overwrite"], check=True, capture_output=True)
    if not model.exists():
        build = (f"from tetra.model import ModelConfig, Transformer; from tetra.model.io import save_hf_model; "
                 f"m = Transformer(ModelConfig(vocab_size={args.vocab}, hidden_size={args.width}, "
                 f"n_layers={args.layers}, n_heads=16, n_kv_heads=4, intermediate_size={int(2.75 * args.width)}, "
                 f"max_position_embeddings={args.seq})); m.init_weights(0.02, seed=0); "
                 f"save_hf_model(m, {str(model)!r})")
        subprocess.run([sys.executable, "-c", build], check=True)
    return data, model


def _run_grid(grid: str, data: Path, model: Path, scratch: Path, args: argparse.Namespace,
              allocator: str) -> list[dict]:
    from tetra.config import dump_toml

    sizes = _sizes(grid)
    world = 1
    for size in sizes.values():
        world *= size
    run_dir = scratch / f"run-{grid.replace(',', '-').replace('=', '')}"
    values = {"init": {"checkpoint": str(model)}, "data": {"path": str(data), "seq_len": args.seq},
              "train": {"max_steps": 3, "batch_size": 4 // sizes.get("data", 1) // sizes.get("depth", 1),
                        "warmup_steps": 1, "precision": "fp32"},
              "eval": {"every": 0},
              "run": {"dir": str(run_dir), "checkpoint_every": 3, "keep_checkpoints": 1, "device": args.device,
                      "export_hf": True},
              "parallel": {name: sizes.get(name, 1) for name in ("data", "depth", "row", "col")}}
    config_path = scratch / f"{run_dir.name}.toml"
    config_path.write_text(dump_toml(values))
    out = scratch / f"{run_dir.name}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
               str(29600 + len(grid)), __file__, "--worker", "--config", str(config_path), "--out", str(out),
               "--device", args.device]
    environment = dict(os.environ)
    if allocator == "return":  # glibc hands every block over 64 KiB back to the system when it is freed
        environment.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    shutil.rmtree(run_dir, ignore_errors=True)
    limit = args.data_limit_mib * 2**20
    result = subprocess.run(command, capture_output=True, text=True, env=environment,
                            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))) if limit
                            else None)
    if result.returncode != 0:
        stopped = [line for line in result.stderr.splitlines() if line.startswith("error: Out of memory")]
        if stopped:
            return [{"out_of_memory": stopped[0]}]
        raise SystemExit(f"grid {grid} failed:\n{result.stderr[-3000:]}")
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(world)]


def _predicted(grid: str, model: Path, args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    from tetra.model.io import read_model_config
    from tetra.parallel.grid import GridShape
    from tetra.parallel.planner import MachineProfile, predict

    sizes = _sizes(grid)
    shape = GridShape(sizes.get("data", 1), sizes.get("depth", 1), sizes.get("row", 1), sizes.get("col", 1))
    prediction = predict(read_model_config(model), shape, global_batch=4, seq_len=args.seq,
                         machine=MachineProfile.load("dgx-h100"), value_bytes=4)
    return sum(prediction.memory.values()), prediction.memory


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as temporary:
        scratch = Path(args.scratch or temporary)
        scratch.mkdir(parents=True, exist_ok=True)
        data, model = _prepare(scratch, args)
        from tetra.model.io import read_model_config

        parameters = read_model_config(model).num_parameters()
        print(f"model: {parameters / 1e6:.1f}M parameters (fp32 weights {parameters * 4 / 2**30:.2f} GiB), "
              f"{args.device}, global batch 4 x {args.seq} tokens, 3 steps + a sharded checkpoint")
        print("MiB per rank over the process's baseline (the largest rank); 'returned': glibc gives large freed "
              "blocks back (MALLOC_MMAP_THRESHOLD_=65536), 'default': glibc's own policy, which keeps them")
        print(f"{'grid':<16}{'ranks':>6}{'loaded':>8}{'peak returned':>15}{'peak default':>14}{'planner':>9}"
              f"{'returned/plan':>15}{'default/plan':>14}   planner terms (MiB)")
        for grid in args.grids:
            peaks, loaded = {"return": float("nan"), "default": float("nan")}, float("nan")
            for allocator in args.allocators:
                rows = _run_grid(grid, data, model, scratch, args, allocator)
                if "out_of_memory" in rows[0]:
                    break
                peaks[allocator] = max(row["after_train_and_save"] for row in rows)
                loaded = max(row["after_load"] for row in rows)
            if "out_of_memory" in rows[0]:
                print(f"{grid:<16} stopped: {rows[0]['out_of_memory']}", flush=True)
                continue
            predicted, terms = _predicted(grid, model, args)
            detail = ", ".join(f"{name} {value / 2**20:.0f}" for name, value in terms.items() if value)
            print(f"{grid:<16}{len(rows):>6}{loaded / 2**20:>8.0f}{peaks['return'] / 2**20:>15.0f}"
                  f"{peaks['default'] / 2**20:>14.0f}{predicted / 2**20:>9.0f}{peaks['return'] / predicted:>15.2f}"
                  f"{peaks['default'] / predicted:>14.2f}   {detail}", flush=True)


if __name__ == "__main__":
    main()
