"""Training throughput: tetra's loop vs a plain PyTorch loop over transformers' LlamaForCausalLM, same process.

Run: python benchmarks/train_throughput.py [--layers 6 --width 384 --seq 256 --batch 8 --steps 20]
Both train the same Llama shape on the same batches (the Python standard library, tokenized here). Prints tokens/s,
the ratio tetra / transformers, and tetra's MFU. The transformers loop is shown plain (fp32, as most scripts run it)
and with bf16 autocast, so the ratio is not only a precision effect.
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


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data = make_dataset(Path(scratch), args.vocab)
        intermediate = 64 * ((8 * args.width // 3 + 63) // 64)
        model_keys = {"hidden_size": args.width, "n_layers": args.layers, "n_heads": args.heads,
                      "intermediate_size": intermediate, "max_position_embeddings": args.seq}
        config = build_run_config({
            "model": model_keys, "data": {"path": str(data), "seq_len": args.seq},
            "train": {"batch_size": args.batch, "max_steps": 1000, "warmup_steps": 10, "precision": args.precision},
            "run": {"dir": str(Path(scratch) / "run"), "device": args.device}})
        loop, _ = build_loop(config, model_keys)
        device = loop.device
        engines = {"tetra": loop.step}

        torch.manual_seed(0)
        hf_config = LlamaConfig(vocab_size=loop.model.config.vocab_size, hidden_size=args.width,
                                intermediate_size=intermediate, num_hidden_layers=args.layers,
                                num_attention_heads=args.heads, max_position_embeddings=args.seq)
        for label, autocast in (("transformers fp32", False), ("transformers bf16 autocast", True)):
            hf_model = LlamaForCausalLM(hf_config).to(device).train()
            optimizer = torch.optim.AdamW(hf_model.parameters(), lr=3e-4, weight_decay=0.1)

            def hf_step(index, hf_model=hf_model, optimizer=optimizer, autocast=autocast):
                tokens = loop.train_batches.batch(index).to(device)
                context = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                with context:
                    logits = hf_model(input_ids=tokens[:, :-1]).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(hf_model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            engines[label] = hf_step
        results = interleaved_seconds(engines, args.steps, device)
        tetra_seconds = results.pop("tetra")

    tokens = args.steps * args.batch * args.seq
    tetra_rate = tokens / tetra_seconds
    peak, source = peak_flops(device, loop.autocast_dtype or torch.float32)
    mfu = flops_per_token(loop.model.config, args.seq) * tetra_rate / peak
    parameters = sum(p.numel() for p in loop.model.parameters())
    print(f"model: Llama shape, {args.layers} layers, width {args.width}, vocab {loop.model.config.vocab_size}, "
          f"{parameters / 1e6:.1f}M parameters; batch {args.batch} x seq {args.seq}; {device}, "
          f"{torch.get_num_threads()} threads; tetra precision: {loop.autocast_dtype or torch.float32}")
    print(f"{'engine':<28} {'tokens/s':>10} {'tetra ratio':>12}")
    print(f"{'tetra':<28} {tetra_rate:>10.0f} {'':>12}   MFU {mfu:.1%} of {peak / 1e12:.2f} TFLOP/s ({source})")
    for label, seconds in results.items():
        rate = tokens / seconds
        print(f"{label:<28} {rate:>10.0f} {tetra_rate / rate:>11.2f}x")


if __name__ == "__main__":
    main()
