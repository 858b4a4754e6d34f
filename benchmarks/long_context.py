"""Decode cost of each attention policy against dense attention, by context length: time per token and cache memory.

Run: python benchmarks/long_context.py [--lengths 1k 4k 16k 64k 256k] [--budget 0.02] [--shape small|1b]
     [--device cpu|cuda] [--memory-budget-gib 16]

A Llama-shaped model with random weights (cost does not depend on the weights) decodes after a cache filled with
random keys and values of the given length (no prefill is timed: the cost of a decode step depends only on what the
cache holds). At each length every policy's cache is built, then the policies' decode steps are timed interleaved,
round after round, and the median per token is reported with its ratio to dense (above 1 = faster than dense). The
crossover is the shortest measured length from which on a policy beats dense at every longer length. Memory is what
each cache holds, per device; the last table is the longest context each policy's device-resident state allows in
--memory-budget-gib, computed from those per-token byte counts with the model's weights taken off the top.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tetra.infer.attention.factory import make_cache
from tetra.infer.attention.h2o import H2OCache
from tetra.infer.attention.loki import LokiBasis
from tetra.infer.attention.policy import AttentionPolicy
from tetra.model import ModelConfig, Transformer

SHAPES = {
    # 4 layers, GQA 8/2, head_dim 64: small enough for 256k+ tokens on a 24 GiB CPU machine.
    "small": ModelConfig(vocab_size=1024, hidden_size=512, n_layers=4, n_heads=8, n_kv_heads=2,
                         max_position_embeddings=1 << 21),
    # Llama-3.2-1B's shape: 16 layers, 32 query / 8 KV heads of 64, MLP 8192.
    "1b": ModelConfig(vocab_size=128256, hidden_size=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                      intermediate_size=8192, max_position_embeddings=1 << 21, rope_theta=500000.0,
                      tie_embeddings=True),
}
FILL_CHUNK = 16384


def parse_length(text: str) -> int:
    text = text.lower()
    if text.endswith("m"):
        return int(float(text[:-1]) * (1 << 20))
    return int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)


def random_basis(config: ModelConfig, generator: torch.Generator) -> LokiBasis:
    """An orthonormal basis per layer and KV head (a calibration's cost equals any other's)."""
    dim = config.resolved_head_dim
    components = [torch.linalg.qr(torch.randn(config.kv_heads, dim, dim, generator=generator))[0]
                  for _ in range(config.n_layers)]
    return LokiBasis(components, [torch.ones(config.kv_heads, dim) for _ in components], 0)


def filled_cache(model: Transformer, policy: AttentionPolicy, length: int, room: int, basis_file: str | None,
                 generator: torch.Generator, dtype: torch.dtype):
    """A cache of `policy` holding `length` random keys/values (N(0, 1)), its prefill ended."""
    config = model.config
    policy = AttentionPolicy(policy.kind, policy.budget, policy.recent, policy.rank, policy.index, policy.probe,
                             basis_file if policy.kind == "loki" else None)
    cache = make_cache(model, policy, 1, length + room, dtype)
    device = model.embed.weight.device
    shape = (1, config.kv_heads, 0, config.resolved_head_dim)
    for layer in range(config.n_layers):
        for start in range(0, length, FILL_CHUNK):
            count = min(FILL_CHUNK, length - start)
            size = (shape[0], shape[1], count, shape[3])
            keys = torch.randn(size, generator=generator).to(device, dtype)
            values = torch.randn(size, generator=generator).to(device, dtype)
            cache.update(layer, keys, values, start)
    if isinstance(cache, H2OCache):
        cache.mass[:, :, :, :length] = torch.rand(cache.mass[:, :, :, :length].shape, generator=generator).to(
            cache.mass.device)
        cache.length = length
    cache.end_prefill(None)
    return cache


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plot(rows: dict, lengths: list[int], names: list[str], path: str, title: str) -> None:
    """Two panels: ms per token and device-resident MiB against context length (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        speed.plot(lengths, [1000 * rows[n][name][0] for n in lengths], marker="o", label=name)
        memory.plot(lengths, [rows[n][name][1] / 2**20 for n in lengths], marker="o", label=name)
    for axis, label in ((speed, "ms per decoded token"), (memory, "device-resident cache (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    speed.legend(fontsize=8)
    figure.suptitle(f"Decode cost by attention policy ({title})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", default=["1k", "4k", "16k", "64k", "256k"])
    parser.add_argument("--budget", type=float, default=0.02)
    parser.add_argument("--recent", type=int, default=64)
    parser.add_argument("--policies", nargs="+",
                        default=["dense", "topk", "topk-index:flat", "topk-index:ivf", "loki", "h2o"])
    parser.add_argument("--shape", choices=list(SHAPES), default="small")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="model and cache dtype (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="decode steps per policy per round")
    parser.add_argument("--memory-budget-gib", type=float, default=16.0)
    parser.add_argument("--plot", help="write time per token and memory against length to this PNG")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = SHAPES[args.shape]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)
    model.init_weights()
    model.eval()
    basis_file = "/tmp/tetra-bench-loki.safetensors"
    random_basis(config, generator).save(basis_file)
    policies = {}
    for name in args.policies:
        kind, _, index = name.partition(":")
        policies[name] = AttentionPolicy(kind, 1.0 if kind == "dense" else args.budget, args.recent,
                                         index=index or "flat")
    room = args.rounds * args.steps + 2
    lengths = [parse_length(text) for text in args.lengths]
    print(f"{args.shape} model ({config.n_layers} layers, {config.n_heads}/{config.kv_heads} heads of "
          f"{config.resolved_head_dim}), {dtype}, {device}; budget {args.budget:g} + {args.recent} recent; median of "
          f"{args.rounds} interleaved rounds x {args.steps} steps")
    rows = {}
    for length in lengths:
        caches, build_s = {}, {}
        for name, policy in policies.items():
            start = time.perf_counter()
            caches[name] = filled_cache(model, policy, length, room, basis_file, generator, dtype)
            synchronize(device)
            build_s[name] = time.perf_counter() - start
        position = dict.fromkeys(policies, length)
        samples: dict[str, list[float]] = {name: [] for name in policies}
        token = torch.tensor([[7]], device=device)
        with torch.inference_mode():
            for _ in range(args.rounds):
                for name, cache in caches.items():
                    synchronize(device)
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        model(token, kv_cache=cache, cache_start=position[name], last_only=True)
                        position[name] += 1
                    synchronize(device)
                    samples[name].append((time.perf_counter() - start) / args.steps)
        dense_s = statistics.median(samples["dense"]) if "dense" in samples else None
        rows[length] = {}
        print(f"\ncontext {length:,} tokens")
        print(f"  {'policy':<18}{'ms/token':>10}{'x dense':>9}{'device MiB':>12}{'host MiB':>10}{'build s':>9}")
        for name in policies:
            seconds = statistics.median(samples[name])
            held = caches[name].memory_bytes()
            on_device = held.get(device.type, 0) if device.type != "cpu" else sum(held.values())
            host = held.get("cpu", 0) if device.type != "cpu" else held.get("cpu", 0)
            if device.type == "cpu" and policies[name].kind == "topk-index":
                on_device = caches[name].device_bytes()  # what would stay on an accelerator
                host = caches[name].host_bytes()
            elif device.type == "cpu":
                host = 0
            ratio = f"{dense_s / seconds:.2f}" if dense_s else "-"
            rows[length][name] = (seconds, on_device, host)
            print(f"  {name:<18}{1000 * seconds:>10.2f}{ratio:>9}{on_device / 2**20:>12.1f}{host / 2**20:>10.1f}"
                  f"{build_s[name]:>9.2f}")
        del caches
    if "dense" in policies:
        print("\ncrossover (shortest measured length from which on the policy decodes faster than dense):")
        for name in policies:
            if name == "dense":
                continue
            faster = [n for n in lengths if all(rows[m][name][0] < rows[m]["dense"][0] for m in lengths if m >= n)]
            print(f"  {name:<18}{f'{min(faster):,} tokens' if faster else 'not within the measured lengths'}")
    if args.plot:
        plot(rows, lengths, list(policies), args.plot, f"{args.shape} model, {device.type}, budget {args.budget:g}")
    largest = max(lengths)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = args.memory_budget_gib * 2**30 - weights
    print(f"\nlongest context in {args.memory_budget_gib:g} GiB of device memory ({weights / 2**30:.2f} GiB of weights "
          f"off the top), from each policy's device bytes per token at {largest:,} tokens:")
    for name in policies:
        per_token = rows[largest][name][1] / largest
        kind = policies[name].kind
        if kind == "topk-index":
            fits = "not bounded by the device: the prefix lives in host memory, only the window stays"
        elif kind == "h2o":
            dense_per_token = rows[largest]["dense"][1] / largest if "dense" in rows[largest] else per_token
            fits = (f"{int(budget / dense_per_token):,} tokens: its prompt is prefilled into a dense cache before "
                    f"eviction (decoding then holds {per_token:.0f} B/token)")
        else:
            fits = f"{int(budget / per_token):,} tokens"
        print(f"  {name:<18}{per_token:>10.0f} B/token  {fits}")


if __name__ == "__main__":
    main()
