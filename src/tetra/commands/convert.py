"""`tetra convert from-hf | to-hf | from-gguf`: move models between Hugging Face folders, tetra checkpoints and
GGUF files (read only: dequantized).

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
import math
import re
import tempfile
from pathlib import Path

import torch

from tetra.adapters.peft_io import load_model_with_adapter
from tetra.commands.common import print_json
from tetra.data.gguf_tokenizer import load_tokenizer
from tetra.devices import resolve_dtype
from tetra.errors import CheckpointError, ConfigError
from tetra.files import is_gguf_file
from tetra.model import Transformer
from tetra.model.checkpoint_tensors import CheckpointTensors
from tetra.model.hf_export import export_hf_streaming
from tetra.model.io import TETRA_CONFIG, load_model, save_hf_model, save_model
from tetra.model.sharded_io import has_shards

EXAMPLES = """examples:
  tetra convert from-hf ./Qwen2.5-0.5B ./checkpoints/qwen-0.5b
  tetra convert to-hf runs/demo/checkpoints/final ./demo-hf     (then AutoModelForCausalLM.from_pretrained)
  tetra convert from-gguf SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2 --to-hf
  tetra convert to-hf runs/sft-lora/checkpoints/step-0000200 ./sft-merged    (LoRA merged into its base)
"""


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ConfigError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or 1000000.")
    units = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return int(float(match[1]) * units[match[2][:1].upper()])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert between Hugging Face folders and tetra checkpoints",
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    directions = parser.add_subparsers(dest="direction", required=True, metavar="{from-hf,to-hf,from-gguf}")
    from_hf = directions.add_parser("from-hf", help="Hugging Face folder -> tetra checkpoint", epilog=EXAMPLES,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    from_hf.add_argument("source", help="folder with config.json and *.safetensors")
    from_hf.add_argument("out", help="new tetra checkpoint folder")
    to_hf = directions.add_parser("to-hf", help="tetra checkpoint -> Hugging Face folder", epilog=EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    to_hf.add_argument("source", help="tetra checkpoint folder (or a Hugging Face folder, to re-shard or re-type)")
    to_hf.add_argument("out", help="new Hugging Face folder")
    to_hf.add_argument("--max-shard-size", default="5GB", help="split weights into files of at most this size")
    to_hf.add_argument("--adapter", help="a LoRA adapter folder (tetra or PEFT) to merge into the model first")
    from_gguf = directions.add_parser("from-gguf", help="GGUF file -> tetra checkpoint or Hugging Face folder",
                                      epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    from_gguf.add_argument("source", help="a .gguf model file (llama or qwen2 architecture, any dequantizable type)")
    from_gguf.add_argument("out", help="new tetra checkpoint folder (or Hugging Face folder with --to-hf)")
    from_gguf.add_argument("--to-hf", action="store_true", help="write a Hugging Face folder instead")
    from_gguf.add_argument("--max-shard-size", default="5GB", help="with --to-hf: files of at most this size")
    for sub in (from_hf, to_hf, from_gguf):
        keep = "float32" if sub is from_gguf else "keep"  # GGUF weights are dequantized to fp32 unless asked
        sub.add_argument("--dtype", default=keep, choices=["keep", "float32", "bfloat16", "float16"])
        sub.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
        sub.add_argument("--json", action="store_true", help="print what was written as JSON")
        sub.set_defaults(handler=run)


def _from_gguf(args: argparse.Namespace, dtype: torch.dtype | None) -> tuple[Transformer, Path]:
    source = Path(args.source)
    if not is_gguf_file(source):
        raise CheckpointError(f"{source} is not a GGUF file (it must exist and start with the GGUF magic bytes). "
                              "Pass the path of a .gguf model file.")
    tokenizer = load_tokenizer(source)  # before the weights: a tokenizer tetra cannot rebuild fails fast
    model = load_model(source, dtype=dtype or torch.float32)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save(scratch)
        if args.to_hf:
            out = save_hf_model(model, args.out, tokenizer_from=scratch, overwrite=args.overwrite,
                                max_shard_bytes=parse_size(args.max_shard_size))
        else:
            out = save_model(model, args.out, tokenizer_from=scratch, overwrite=args.overwrite)
    return model, out


def is_whole_checkpoint(folder: Path) -> bool:
    """A tetra checkpoint with all its weights (not a LoRA adapter alone, not a Hugging Face folder)."""
    return (folder / TETRA_CONFIG).is_file() and ((folder / "model.safetensors").is_file() or
                                                  (folder / "model.safetensors.index.json").is_file() or
                                                  has_shards(folder))


def run(args: argparse.Namespace) -> int:
    # Conversion only moves tensors, so it runs on the CPU whatever the machine has.
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    parameters = None
    if args.direction == "from-gguf":
        model, out = _from_gguf(args, dtype)
    elif args.direction == "from-hf":
        model = load_model(args.source, dtype=dtype)
        out = save_model(model, args.out, tokenizer_from=args.source, overwrite=args.overwrite)
    elif args.adapter is None and is_whole_checkpoint(Path(args.source)):  # streamed: one tensor at a time
        out = export_hf_streaming(args.source, args.out, parse_size(args.max_shard_size), args.overwrite, dtype)
        parameters = sum(math.prod(shape) for shape in CheckpointTensors(Path(args.source)).shapes.values())
    else:  # a LoRA checkpoint (or --adapter) is merged into its base first; a Hugging Face folder re-sharded
        model = load_model_with_adapter(args.source, args.adapter, dtype=dtype)
        out = save_hf_model(model, args.out, tokenizer_from=args.source, overwrite=args.overwrite,
                            max_shard_bytes=parse_size(args.max_shard_size))
    if parameters is None:
        parameters = sum(p.numel() for p in model.parameters())
    files = sorted(path.name for path in Path(out).iterdir())
    if args.json:
        print_json({"out": str(out), "files": files, "parameters": parameters})
    else:
        print(f"wrote {out} ({', '.join(files)})")
    return 0

