"""`tetra serve`: an OpenAI-compatible HTTP server for a checkpoint, Hugging Face folder or GGUF file.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tetra.commands.common import add_model_arguments, load_model_and_tokenizer
from tetra.commands.context_args import add_context_arguments, context_options
from tetra.errors import ConfigError

EXAMPLES = """examples:
  tetra serve models/smollm2 --port 8000
  tetra serve runs/demo/checkpoints/final --name demo --max-batch-size 16
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}'
  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='none'); \\
    print(c.completions.create(model='smollm2', prompt='def f(', max_tokens=20).choices[0].text)"
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a model over the OpenAI API (completions, chat, streaming)",
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--name", help="the model id clients send (default: the model folder's name)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together (KV-cache slots)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="context per sequence (default: the model's, at most 4096)")
    parser.add_argument("--batching", choices=["continuous", "static"], default="continuous",
                        help="continuous: requests join between decode steps; static: a batch runs to its end")
    parser.add_argument("--perplexity-filter", metavar="FILE",
                        help="refuse prompts this calibrated filter flags (400, code prompt_flagged)")
    parser.add_argument("--retokenize", type=float, default=0.0, metavar="P",
                        help="encode text prompts with BPE-dropout, each merge skipped with probability P (0.4)")
    add_context_arguments(parser)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tetra.infer.prompt_filter import PerplexityFilter
    from tetra.serve.listen import bind_socket, serve_forever
    from tetra.serve.server import Server

    if args.max_batch_size < 1:
        raise ConfigError(f"--max-batch-size must be at least 1 (got {args.max_batch_size}).")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise ConfigError(f"--max-model-len must be at least 2 (got {args.max_model_len}).")
    if not 0 <= args.retokenize < 1:
        raise ConfigError(f"--retokenize must lie in [0, 1) (got {args.retokenize}).")
    context = context_options(args)
    guard = PerplexityFilter.load(args.perplexity_filter) if args.perplexity_filter else None
    sock = bind_socket(args.host, args.port)  # before loading: a taken port fails in a second, not a minute
    model, tokenizer = load_model_and_tokenizer(args)
    name = args.name or Path(args.model).name.removesuffix(".gguf")
    server = Server(model, tokenizer, name, args.max_batch_size, args.max_model_len, args.batching == "continuous",
                    guard, args.retokenize, context=context)
    host, port = sock.getsockname()[:2]
    sys.stderr.write(f"serving {name!r} on http://{host}:{port}/v1 (context {server.max_length}, "
                     f"{args.max_batch_size} slots, {args.batching} batching, "
                     f"{context.attention.describe()} attention)\n")
    serve_forever(server, sock, args.log_level)
    return 0
