"""A small scaling study on the standard-library corpus, at CPU scale: configs/sweep-stdlib.toml's 8 shapes (widths
64..192 x depths 2 and 4) x 3 token budgets (0.5M, 1M, 2M), one warmup-stable run per shape with a cooldown branch
per budget; the Chinchilla approach-3 fit with bootstrap intervals (and the width-depth law), how the prescription
moves when the smallest models or the smallest budget are left out (the Gemstones point), and a check against a
held-out larger model (width 256, depth 4, 2M tokens) that the fit never saw.

Results (table, fits, plots) go to experiments/out/scaling_study/ and docs/scaling.md.

Run: python experiments/scaling_study.py            (about 25 minutes on 2 CPU cores, the data included)
     python experiments/scaling_study.py --smoke    (tiny shapes on arithmetic data; the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from tetra.cli import main as tetra
from tetra.science.scaling_fit import MAX_STARTS, bootstrap, fit_law, grid_of_starts, intervals
from tetra.science.scaling_plots import plot_fit
from tetra.science.sweep import read_table

BUDGET = 1e15  # FLOPs to state the compute-optimal allocation at (about 50x the study's largest run)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/out/scaling_study")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--smoke", action="store_true")
    return parser.parse_args(argv)


def prepare_data(out: Path, smoke: bool) -> Path:
    data = out / "data"
    if data.is_dir():
        return data
    if smoke:
        steps = [["data", "arithmetic", "--max-digits", "3", "--examples", "2000", "--out", str(data)]]
    else:
        steps = [["tokenizer", "train", "stdlib", "--vocab-size", "4096", "--out", str(out / "tokenizer")],
                 ["data", "prepare", "stdlib", "--tokenizer", str(out / "tokenizer"), "--out", str(data)]]
    for step in steps:
        if tetra(step) != 0:
            raise SystemExit(f"could not prepare the data: tetra {' '.join(step)}")
    return data


def sweep_file(out: Path, name: str, data: Path, grid: str, smoke: bool) -> Path:
    base = Path("configs/sweep-stdlib-base.toml").resolve()
    extra = '"train.warmup_steps=2", "model.vocab_size=0", ' if smoke else ""
    path = out / f"{name}.toml"
    path.write_text(f'[sweep]\nbase = "{base}"\nout = "{out / name}"\n{grid}\nhead_width = {8 if smoke else 32}\n'
                    f'cooldowns = true\ncooldown_fraction = 0.2\noverrides = [{extra}"data.path={data}"]\n')
    return path


def fit_report(rows: list[dict], resamples: int, label: str, starts: int = MAX_STARTS) -> dict:
    features = np.array([[row["non_embedding_params"], row["tokens"]] for row in rows], dtype=float)
    losses = np.array([row["loss"] for row in rows], dtype=float)
    law = fit_law(features, losses, ("params", "tokens"), starts=grid_of_starts(2, limit=starts))
    fits = bootstrap(features, losses, law, resamples)
    params, tokens = law.compute_optimal(BUDGET)
    spread = [fit.compute_optimal(BUDGET)[0] for fit in fits]
    return {"label": label, "runs": len(rows), "law": law, **law.as_dict(), "intervals_95": intervals(fits),
            "optimal_params": params, "optimal_tokens": tokens,
            "optimal_params_95": [float(np.percentile(spread, 2.5)), float(np.percentile(spread, 97.5))]
            if spread else None}


def _interval(intervals_95: dict, key: str) -> str:
    """" (low-high)", or nothing when no bootstrap refit succeeded."""
    return f" ({intervals_95[key][0]:.3f}-{intervals_95[key][1]:.3f})" if key in intervals_95 else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(out, args.smoke)
    if args.smoke:
        grid, held_out, args.bootstrap = "widths = [16, 24]\ndepths = [1, 2]\ntokens = [1e4, 2e4, 3e4]", \
            "widths = [32]\ndepths = [2]\ntokens = [3e4]", 4
    else:
        grid = "widths = [64, 96, 128, 192]\ndepths = [2, 4]\ntokens = [5e5, 1e6, 2e6]"
        held_out = "widths = [256]\ndepths = [4]\ntokens = [2e6]"
    for name, cells in (("sweep", grid), ("held_out", held_out)):
        if tetra(["sweep", str(sweep_file(out, name, data, cells, args.smoke))]) != 0:
            raise SystemExit(f"the {name} sweep failed")
    rows, (larger,) = read_table(out / "sweep"), read_table(out / "held_out")
    smallest_width, smallest_budget = min(r["width"] for r in rows), min(r["tokens"] for r in rows)
    starts = 40 if args.smoke else MAX_STARTS
    reports = [fit_report(rows, args.bootstrap, "all runs", starts),
               fit_report([r for r in rows if r["width"] != smallest_width], args.bootstrap,
                          f"without width {smallest_width}", starts),
               fit_report([r for r in rows if r["tokens"] != smallest_budget], args.bootstrap,
                          f"without the {smallest_budget:.3g}-token budget", starts)]
    full = reports[0]["law"]
    predicted = float(full.predict([[larger["non_embedding_params"], larger["tokens"]]])[0])
    plot_fit(rows, full, np.array([[r["non_embedding_params"], r["tokens"]] for r in rows], dtype=float),
             out / "scaling_fit.png")
    lines = ["| width | depth | non-embedding params | tokens | loss |", "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['width']} | {r['depth']} | {r['non_embedding_params']:,} | {r['tokens']:,} | {r['loss']:.4f} |"
              for r in sorted(rows, key=lambda r: (r["non_embedding_params"], r["tokens"]))]
    lines += ["", "| fit | runs | E | A | alpha | B | beta | optimal N at 1e15 FLOPs (95%) | optimal D |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for report in reports:
        p, ci = report["parameters"], report["intervals_95"]
        low, high = report["optimal_params_95"] or [float("nan")] * 2
        lines.append(f"| {report['label']} | {report['runs']} | {p['E']:.3f} | {p['A_params']:.3g} | "
                     f"{p['alpha_params']:.3f}{_interval(ci, 'alpha_params')} | {p['A_tokens']:.3g} | "
                     f"{p['alpha_tokens']:.3f}{_interval(ci, 'alpha_tokens')} | {report['optimal_params']:.3g} "
                     f"({low:.3g}-{high:.3g}) | {report['optimal_tokens']:.3g} |")
    error = predicted / larger["loss"] - 1
    lines += ["", f"held-out width {larger['width']} x depth {larger['depth']} ({larger['non_embedding_params']:,} "
              f"non-embedding parameters, {larger['tokens']:,} tokens): observed {larger['loss']:.4f}, predicted "
              f"{predicted:.4f} ({100 * error:+.2f}%)"]
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "table.md").write_text(text, encoding="utf-8")
    summary = [{k: v for k, v in report.items() if k != "law"} for report in reports]
    (out / "results.json").write_text(json.dumps({"fits": summary, "held_out": larger, "predicted": predicted,
                                                  "relative_error": error}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
