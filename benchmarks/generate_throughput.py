"""Generation throughput: tetra vs transformers `generate` on the same weights, in the same process.

Run: python benchmarks/generate_throughput.py [--layers 8 --width 512 --prompt 128 --new 256 --batches 1 8]
Prints tokens/s for each and the ratio tetra / transformers, and checks that greedy outputs are identical.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tetra.infer.generate import generate_ids
from tetra.model.io import load_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    parser.add_argument("--new", type=int, default=256, help="tokens to generate")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per engine (best is reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    return parser.parse_args()


def timed(run, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_times(runs: dict, repeats: int, device: str) -> dict[str, float]:
    """Best of `repeats` for each engine, interleaved so that machine noise hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(run, device))
    return {name: min(values) for name, values in times.items()}


def main() -> None:
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.width, intermediate_size=int(args.width * 8 / 3),
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.prompt + args.new,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf_model = LlamaForCausalLM(config).to(device=args.device, dtype=dtype).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf_model.save_pretrained(folder)
        model = load_model(folder, dtype=dtype, device=args.device)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"model: {args.layers} layers, width {args.width}, {parameters / 1e6:.1f}M parameters, {args.dtype}, "
          f"{args.device}, {torch.get_num_threads()} threads; prompt {args.prompt}, {args.new} new tokens")
    print(f"{'batch':>5} {'tetra tok/s':>12} {'HF tok/s':>10} {'ratio':>7}  identical")
    for batch in args.batches:
        prompts = torch.randint(1, args.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        prompt_lists = prompts.tolist()
        hf_input = prompts.to(args.device)

        def run_tetra(prompt_lists=prompt_lists):
            return generate_ids(model, prompt_lists, args.new)

        def run_hf(hf_input=hf_input):
            with torch.inference_mode():
                return hf_model.generate(hf_input, attention_mask=torch.ones_like(hf_input), max_new_tokens=args.new,
                                         min_new_tokens=args.new, do_sample=False, pad_token_id=0)

        tetra_out, hf_out = run_tetra(), run_hf()  # warm-up, and the outputs to compare
        identical = tetra_out == hf_out[:, args.prompt:].tolist()
        tokens = batch * args.new
        best = best_times({"tetra": run_tetra, "hf": run_hf}, args.repeats, args.device)
        tetra_rate, hf_rate = tokens / best["tetra"], tokens / best["hf"]
        print(f"{batch:>5} {tetra_rate:>12.1f} {hf_rate:>10.1f} {tetra_rate / hf_rate:>6.2f}x  {identical}")


if __name__ == "__main__":
    main()
