"""Which learning rate is best, as model size and token budget change: a sweep at three peak learning rates on the
standard-library corpus (widths 64 and 128 x depths 2 and 4, budgets 0.5M and 1M tokens, one warmup-stable run per
shape and rate with a cooldown branch per budget), the best rate at every (model size, budget) point, the step
law's lr_opt = c N^a D^b refitted to them (what `tetra plan --hparams --sweep DIR` prints), and the published step
law's rates at the same points for comparison.

Results go to experiments/out/lr_study/ (table.md, results.json) and docs/scaling.md.

Run: python experiments/lr_study.py [--data experiments/out/scaling_study/data]   (about 20 minutes on 2 CPU cores)
     python experiments/lr_study.py --smoke    (tiny shapes on arithmetic data; the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaling_study import prepare_data, sweep_file  # noqa: E402

from tetra.cli import main as tetra  # noqa: E402
from tetra.science.hparams import best_learning_rates, fit_learning_rate_law, step_law  # noqa: E402
from tetra.science.sweep import read_table  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/out/lr_study")
    parser.add_argument("--data", help="a prepared data folder to reuse (default: prepared under --out)")
    parser.add_argument("--smoke", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.data) if args.data else prepare_data(out, args.smoke)
    if args.smoke:
        grid = "widths = [16, 24]\ndepths = [1]\nlrs = [3e-3, 1e-2]\ntokens = [1e4, 2e4]"
    else:
        grid = "widths = [64, 128]\ndepths = [2, 4]\nlrs = [1e-3, 3e-3, 1e-2]\ntokens = [5e5, 1e6]"
    if tetra(["sweep", str(sweep_file(out, "sweep", data, grid, args.smoke))]) != 0:
        raise SystemExit("the sweep failed")
    rows = read_table(out / "sweep")
    rates = sorted({row["lr"] for row in rows})
    law = fit_learning_rate_law(rows)
    best = {(n, d): lr for n, d, lr in best_learning_rates(rows)}
    losses = {(float(r["non_embedding_params"]), float(r["tokens"]), r["lr"]): r["loss"] for r in rows}
    lines = ["| non-embedding params | tokens | " + " | ".join(f"loss at lr {lr:g}" for lr in rates) +
             " | best lr (parabola in log lr) | refitted law | published step law |",
             "| ---: | ---: | " + " | ".join("---:" for _ in rates) + " | ---: | ---: | ---: |"]
    points = []
    for (n, d), lr in sorted(best.items()):
        fitted, published = law(n, d), step_law(n, d).lr
        points.append({"params": n, "tokens": d, "best_lr": lr, "refitted_lr": fitted, "step_law_lr": published,
                       "losses": {f"{rate:g}": losses.get((n, d, rate)) for rate in rates}})
        cells = " | ".join(f"{losses[(n, d, rate)]:.4f}" for rate in rates)
        lines.append(f"| {n:,.0f} | {d:,.0f} | {cells} | {lr:.2e} | {fitted:.2e} | {published:.2e} |")
    lines += ["", f"refitted: lr_opt = {law.coefficient:.3g} N^{law.params_exponent:.3f} D^{law.tokens_exponent:.3f} "
              "(published: 1.79 N^-0.713 D^0.307)"]
    text = "\n".join(lines) + "\n"
    print(text)
    (out / "table.md").write_text(text, encoding="utf-8")
    (out / "results.json").write_text(json.dumps({
        "law": {"coefficient": law.coefficient, "params_exponent": law.params_exponent,
                "tokens_exponent": law.tokens_exponent}, "points": points}, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
