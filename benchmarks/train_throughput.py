"""Training throughput: tetra's loop vs a plain PyTorch loop over transformers' LlamaForCausalLM, same process.

Run: python benchmarks/train_throughput.py [--layers 6 --width 384 --seq 256 --batch 8 --steps 20] [--no-compile]
     [--default-allocator]
Both train the same Llama shape on the same batches (the Python standard library, tokenized here), taking turns
step by step. Prints tokens/s, MFU (of the GEMM peak measured here at each row's precision, or the datasheet's on a
known GPU) and the speed ratio against transformers under bf16 autocast (tetra's precision on CPU). Rows: tetra
eager and with train.compile (torch.compile of the model), transformers fp32 (as most scripts run it), with bf16
autocast, and with bf16 autocast and torch.compile, so a ratio is neither a precision nor a compiler effect alone.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tetra.config import build_run_config
from tetra.data.prepare import prepare_data
from tetra.data.sources import iter_documents
from tetra.data.tokenizer import train_bpe
from tetra.train.loop import build_loop
from tetra.train.metrics import flops_per_token, peak_flops


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per engine (after 3 warm-up steps)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="tetra's train.precision")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile rows (they need a C++ compiler on CPU)")
    parser.add_argument("--no-fp32", dest="fp32", action="store_false",
                        help="skip the transformers fp32 row (a third copy of the model's training state)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="train.keep_freed_memory=false: leave glibc's allocator as it is (process-wide, so "
                             "for both engines; compare two runs)")
    return parser.parse_args()


def make_dataset(folder: Path, vocab: int) -> Path:
    documents = list(iter_documents("stdlib"))[:150]
    train_bpe(documents, vocab).save(folder / "tokenizer")
    source = folder / "docs"
    source.mkdir()
    for index, document in enumerate(documents):
        (source / f"{index:04d}.txt").write_text(document)
    prepare_data(str(source), folder / "tokenizer", folder / "data", val_fraction=0.0, show_progress=False)
    return folder / "data"


def interleaved_seconds(engines: dict, steps: int, device: torch.device) -> dict[str, float]:
    """Seconds per engine for `steps` steps after 3 warm-up steps, taking turns step by step so that machine noise
    (other processes, clock changes) falls on every engine alike."""
    seconds = dict.fromkeys(engines, 0.0)
    for index in range(3 + steps):
        for name, step in engines.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(index)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if index >= 3:
                seconds[name] += time.perf_counter() - start
    return seconds


def hf_engine(loop, hf_config: LlamaConfig, device: torch.device, autocast: bool, compiled: bool):
    """One optimizer step of a plain loop over transformers' Llama (full logits, fp32 cross-entropy)."""
    torch.manual_seed(0)
    hf_model = LlamaForCausalLM(hf_config).to(device).train()
    forward = torch.compile(hf_model) if compiled else hf_model
    optimizer = torch.optim.AdamW(hf_model.parameters(), lr=3e-4, weight_decay=0.1)

    def step(index: int) -> None:
        tokens = loop.train_batches.batch(index).to(device)
        context = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            logits = forward(input_ids=tokens[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data = make_dataset(Path(scratch), args.vocab)
        intermediate = 64 * ((8 * args.width // 3 + 63) // 64)
        model_keys = {"hidden_size": args.width, "n_layers": args.layers, "n_heads": args.heads,
                      "intermediate_size": intermediate, "max_position_embeddings": args.seq}
        engines, precisions, loop = {}, {}, None
        for compiled in (False, True) if args.compile else (False,):
            config = build_run_config({
                "model": model_keys, "data": {"path": str(data), "seq_len": args.seq},
                "train": {"batch_size": args.batch, "max_steps": 1000, "warmup_steps": 10,
                          "precision": args.precision, "compile": compiled,
                          "keep_freed_memory": not args.default_allocator},
                "run": {"dir": str(Path(scratch) / f"run-{compiled}"), "device": args.device}})
            loop, _ = build_loop(config, model_keys)
            label = "tetra + compile" if compiled else "tetra"
            engines[label], precisions[label] = loop.step, loop.autocast_dtype or torch.float32
        device = loop.device
        hf_config = LlamaConfig(vocab_size=loop.model.config.vocab_size, hidden_size=args.width,
                                intermediate_size=intermediate, num_hidden_layers=args.layers,
                                num_attention_heads=args.heads, max_position_embeddings=args.seq)
        variants = [("transformers fp32", False, False)] if args.fp32 else []
        variants.append(("transformers bf16 autocast", True, False))
        if args.compile:
            variants.append(("transformers bf16 autocast + compile", True, True))
        for label, autocast, compiled in variants:
            engines[label] = hf_engine(loop, hf_config, device, autocast, compiled)
            precisions[label] = torch.bfloat16 if autocast else torch.float32
        results = interleaved_seconds(engines, args.steps, device)

    tokens = args.steps * args.batch * args.seq
    rates = {label: tokens / seconds for label, seconds in results.items()}
    flops = flops_per_token(loop.model.config, args.seq)
    peaks = {dtype: peak_flops(device, dtype) for dtype in set(precisions.values())}
    baseline = rates["transformers bf16 autocast"]
    parameters = sum(p.numel() for p in loop.model.parameters())
    print(f"model: Llama shape, {args.layers} layers, width {args.width}, vocab {loop.model.config.vocab_size}, "
          f"{parameters / 1e6:.1f}M parameters; batch {args.batch} x seq {args.seq}; {device}, "
          f"{torch.get_num_threads()} threads; tetra precision: {precisions['tetra']}")
    print(f"{'engine':<38} {'tokens/s':>9} {'MFU':>6} {'vs transformers bf16':>21}")
    for label, rate in rates.items():
        peak, _ = peaks[precisions[label]]
        print(f"{label:<38} {rate:>9.0f} {flops * rate / peak:>6.1%} {rate / baseline:>20.2f}x")
    for dtype, (peak, source) in peaks.items():
        print(f"peak for {str(dtype).removeprefix('torch.')}: {peak / 1e12:.2f} TFLOP/s ({source})")


if __name__ == "__main__":
    main()
