"""Load on `tetra serve`: N concurrent streaming chat clients on loopback; continuous batching, continuous batching
with chunked prefill, and static batching take turns on the same requests.

Run: python benchmarks/serve_load.py [--model models/smollm2] [--clients 1 4 16 64] [--max-tokens 32]
                                     [--context-tokens 0] [--prefill-chunk 64]
Output lengths vary as in real traffic: client i asks for max_tokens * (1 + i % 4) / 4 tokens. With
--context-tokens N, every other client's question comes after about N tokens of Python source (a long prompt
arriving while short ones decode: what chunked prefill is for). For each client count and mode it prints
requests/s, generated tokens/s, p50/p99 time to first token and p50/p99 time per output token, and checks every
streamed answer against the same prompt asked alone (greedy): a lost or garbled stream is counted and reported.
Without --model it serves SmolLM2 from models/smollm2 when present (`make sft` writes it), else a random 30M-parameter
Llama.
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import torch

from tetra.data.gguf_tokenizer import load_tokenizer
from tetra.data.sources import iter_documents
from tetra.data.tokenizer import train_bpe
from tetra.infer.context import ContextOptions
from tetra.model import ModelConfig, Transformer
from tetra.model.io import load_model
from tetra.serve.listen import BackgroundServer
from tetra.serve.server import Server

TOPICS = ["a file", "a list", "a socket", "a thread", "JSON", "a path", "a regex", "a date", "a queue", "a zip file",
          "an enum", "a dataclass", "CSV", "a subprocess", "logging", "a hash"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: models/smollm2 or random)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--context-tokens", type=int, default=0,
                        help="every other client's prompt starts with about this many tokens of source code")
    parser.add_argument("--prefill-chunk", type=int, default=64,
                        help="prompt positions per engine step in the chunked-prefill mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def load(args: argparse.Namespace):
    path = Path(args.model) if args.model else Path("models/smollm2")
    if path.exists():
        return load_model(path, device=args.device), load_tokenizer(path), path.name
    tokenizer = train_bpe(["def f(x):\n    return x\n" * 50, "How do I read a file in Python?"] * 20, vocab_size=512)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=512, n_layers=8, n_heads=8,
                                    max_position_embeddings=1024)).to(args.device)
    model.init_weights()
    return model.eval(), tokenizer, "random-llama"


def stream_once(url: str, name: str, prompt: str, max_tokens: int) -> dict:
    """One streaming chat completion over raw HTTP: arrival time of each chunk and the text."""
    parts = urlparse(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    body = json.dumps({"model": name, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True})
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    arrivals, text, done = [], "", False
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        piece = json.loads(line[6:])["choices"][0]["delta"].get("content")
        if piece:
            arrivals.append(time.perf_counter() - start)
            text += piece
    connection.close()
    return {"arrivals": arrivals, "text": text, "done": done, "seconds": time.perf_counter() - start}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def load_round(url: str, name: str, asks: list[tuple[str, int]], tokenizer, expected: dict[tuple[str, int], str]):
    start = time.perf_counter()
    with ThreadPoolExecutor(len(asks)) as pool:
        results = list(pool.map(lambda ask: stream_once(url, name, *ask), asks))
    wall = time.perf_counter() - start
    bad = sum(not r["done"] or r["text"] != expected[ask] for ask, r in zip(asks, results, strict=True))
    tokens = sum(len(tokenizer.encode(r["text"], add_special_tokens=False)) for r in results)
    first = [r["arrivals"][0] for r in results if r["arrivals"]]
    per_token = [(r["arrivals"][-1] - r["arrivals"][0]) / (len(r["arrivals"]) - 1) for r in results
                 if len(r["arrivals"]) > 1]
    return {"requests_per_s": len(asks) / wall, "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1e3 * percentile(first, 0.5), "ttft_p99_ms": 1e3 * percentile(first, 0.99),
            "tpot_p50_ms": 1e3 * percentile(per_token, 0.5), "tpot_p99_ms": 1e3 * percentile(per_token, 0.99),
            "bad": bad}


def source_prefix(tokenizer, tokens: int, offset: int) -> str:
    """About `tokens` tokens of the Python standard library, a different stretch per offset."""
    if tokens <= 0:
        return ""
    text = "".join(document for document, _ in zip(iter_documents("stdlib"), range(40), strict=False))
    start = offset * 4000 % max(len(text) - 20 * tokens, 1)
    ids = tokenizer.encode(text[start:start + 20 * tokens], add_special_tokens=False)[:tokens]
    return tokenizer.decode(ids) + "\n\n"


MODES = ("continuous", "chunked", "static")


def main() -> None:
    args = parse_args()
    model, tokenizer, name = load(args)
    prompts_all = [(source_prefix(tokenizer, args.context_tokens, index) if index % 2 else "")
                   + f"How do I use {topic} in Python?" for index, topic in enumerate(TOPICS)]
    chunked = ContextOptions(prefill_chunk=args.prefill_chunk)
    servers = {mode: Server(model, tokenizer, name, args.max_batch_size, 2048, mode != "static",
                            context=chunked if mode == "chunked" else None) for mode in MODES}
    contexts = {mode: BackgroundServer(server) for mode, server in servers.items()}
    urls = {mode: context.__enter__() for mode, context in contexts.items()}
    try:
        lengths = [max(1, args.max_tokens * (1 + i % 4) // 4) for i in range(4)]
        expected = {(p, n): stream_once(urls["continuous"], name, p, n)["text"] for p in prompts_all for n in lengths}
        print(f"model {name}, device {args.device}, up to {args.max_tokens} tokens per request, "
              f"{args.max_batch_size} KV-cache slots, every other prompt after ~{args.context_tokens} tokens of "
              f"code, chunked prefill {args.prefill_chunk} positions per step")
        print(f"{'clients':>7} {'batching':>10} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} "
              f"{'TPOT p50':>9} {'p99':>8} {'bad':>4}")
        for clients in args.clients:
            asks = [(prompts_all[i % len(prompts_all)], lengths[i % 4]) for i in range(clients)]
            rows = {}
            for mode in MODES:  # interleaved, same requests
                rows[mode] = row = load_round(urls[mode], name, asks, tokenizer, expected)
                print(f"{clients:>7} {mode:>10} {row['requests_per_s']:7.2f} {row['tokens_per_s']:8.1f} "
                      f"{row['ttft_p50_ms']:8.0f}ms {row['ttft_p99_ms']:6.0f}ms {row['tpot_p50_ms']:8.1f}ms "
                      f"{row['tpot_p99_ms']:6.1f}ms {row['bad']:>4}")
            for mode in ("continuous", "chunked"):
                ratio = rows[mode]["tokens_per_s"] / rows["static"]["tokens_per_s"]
                print(f"{'':>7} {'ratio':>10} {mode} / static tokens/s = {ratio:.2f}x")
    finally:
        for context in contexts.values():
            context.__exit__(None, None, None)


if __name__ == "__main__":
    main()
