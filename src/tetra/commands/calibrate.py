"""`tetra calibrate`: measure this machine (GEMMs, collectives) into a profile for `tetra plan`.

Entry point: register(subparsers).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tetra.commands.common import print_json
from tetra.config import toml_value
from tetra.devices import resolve_device
from tetra.parallel.calibrate import calibrate

EXAMPLES = """examples:
  tetra calibrate --processes 4 --out machines/my-node.toml
  tetra plan --model tiny --devices 4 --machine machines/my-node.toml --global-batch 16 --seq 256
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("calibrate", help="measure this machine into a profile for tetra plan",
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=1, help="local processes (GPUs) for the collectives")
    parser.add_argument("--out", required=True, help="profile TOML to write")
    parser.add_argument("--name", default="local", help="profile name")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    result = calibrate(args.processes, resolve_device(args.device), args.name)
    lines = ["# Measured by `tetra calibrate`. Single-node measurements: inter_node_bandwidth repeats the intra-node",
             "# figure; set it from your network's specification for multi-node plans."]
    lines += [f"{key} = {toml_value(value)}" for key, value in result["profile"].items()]
    lines += ["", "[measurements]", f"gemm = {toml_value(result['gemm'])}",
              f"collectives = {toml_value(result['collectives'])}", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    if args.json:
        print_json(result)
    else:
        profile = result["profile"]
        latencies = ", ".join(f"{seconds * 1e6:.0f} us on {size}"
                              for size, seconds in profile["collective_latency_by_group"]) or "not measured"
        print(f"wrote {out}: bf16 GEMM {profile['gemm_flops'] / 1e12:.2f} TFLOP/s, all-reduce bus bandwidth "
              f"{profile['intra_node_bandwidth'] / 1e9:.2f} GB/s and latency "
              f"{latencies} (ranks per group) over {args.processes} processes; "
              f"{100 * profile['overlap_efficiency']:.0f}% of an all-reduce hides behind a GEMM")
    return 0
