"""The long-context options every decoding command shares: --attention, --budget, --recent, --rank, --index,
--probe, --loki, --prefill-chunk, --kv-dtype, --kv-device.

Entry points: add_context_arguments(parser), context_options(args), loki_path_for(model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tetra.devices import resolve_device
from tetra.infer.attention.loki import LOKI_FILE, LokiBasis
from tetra.infer.attention.policy import INDEX_KINDS, POLICIES, AttentionPolicy
from tetra.infer.context import ContextOptions

KV_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16}


def add_context_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("long context")
    group.add_argument("--attention", default="dense", choices=POLICIES,
                       help="decoding attention: dense, topk (exact), topk-index (prefix keys in a FAISS index in "
                            "CPU memory), loki (PCA-scored top-k) or h2o (heavy-hitter eviction)")
    group.add_argument("--budget", type=float, default=0.02,
                       help="share of the prompt's prefix each decode step attends to (0.02 = 2%%), or above 1 a "
                            "number of keys; for h2o the cache keeps this share plus --recent")
    group.add_argument("--recent", type=int, default=64, help="newest tokens always attended densely")
    group.add_argument("--rank", type=int, default=None, help="loki: principal dimensions that score keys "
                                                             "(default head_dim / 4)")
    group.add_argument("--index", default="flat", choices=INDEX_KINDS, help="topk-index: the FAISS index kind")
    group.add_argument("--probe", type=float, default=0.25, help="topk-index with ivf: share of lists searched")
    group.add_argument("--loki", metavar="FILE", help="loki: the calibration (default: loki.safetensors beside the "
                                                      "model, as `tetra loki calibrate` writes it)")
    group.add_argument("--prefill-chunk", type=int, default=0, metavar="TOKENS",
                       help="prefill the prompt this many tokens at a time (bounds activation memory; in tetra "
                            "serve, one chunk per decode step of the running batch; 0 = at once)")
    group.add_argument("--kv-dtype", default="auto", choices=list(KV_DTYPES), help="KV cache dtype (auto: model's)")
    group.add_argument("--kv-device", default=None, help="where the KV cache lives, e.g. cpu (default: model's)")


def loki_path_for(model: str | Path) -> Path:
    """Where `tetra loki calibrate` puts a model's calibration: inside its folder, or beside a single file."""
    model = Path(model)
    return model / LOKI_FILE if model.is_dir() else model.with_name(model.stem + "." + LOKI_FILE)


def context_options(args: argparse.Namespace) -> ContextOptions:
    """The ContextOptions the command line asked for (the policy is dense unless --attention says otherwise)."""
    loki = args.loki or (str(loki_path_for(args.model)) if args.attention == "loki" else None)
    if loki is not None:
        LokiBasis.load(loki)  # a missing or unreadable calibration fails here, before any output
    budget = args.budget if args.attention != "dense" else 1.0
    policy = AttentionPolicy(args.attention, budget, args.recent, args.rank, args.index, args.probe, loki)
    kv_device = str(resolve_device(args.kv_device)) if args.kv_device else None
    return ContextOptions(policy, args.prefill_chunk, KV_DTYPES[args.kv_dtype], kv_device)
