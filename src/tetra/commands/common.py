"""Output helpers several commands share.

Entry points: print_json, add_model_arguments, load_model_and_tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tetra.adapters.peft_io import load_model_with_adapter
from tetra.data.gguf_tokenizer import load_tokenizer
from tetra.data.tokenizer import TextTokenizer
from tetra.devices import resolve_device, resolve_dtype
from tetra.model import Transformer


def print_json(value: Any) -> None:
    """One JSON object on stdout, for --json."""
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


def add_model_arguments(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    """The model folder and how to load it: tokenizer location, device, dtype. optional: a command that can also
    take its answers elsewhere (an endpoint, a file) may be given no model."""
    parser.add_argument("model", nargs="?" if optional else None,
                        help="tetra checkpoint folder, Hugging Face model folder or .gguf file")
    parser.add_argument("--tokenizer", help="tokenizer folder, if not the model folder")
    parser.add_argument("--adapter", help="a LoRA adapter folder (tetra or PEFT format) to apply to the model")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "keep", "float32", "bfloat16", "float16"])


def load_model_and_tokenizer(args: argparse.Namespace) -> tuple[Transformer, TextTokenizer]:
    """(model, tokenizer) as add_model_arguments asked for."""
    tokenizer = load_tokenizer(Path(args.tokenizer or args.model))
    device = resolve_device(args.device)
    model = load_model_with_adapter(args.model, args.adapter, dtype=resolve_dtype(args.dtype, device), device=device)
    return model, tokenizer
