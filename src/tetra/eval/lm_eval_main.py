"""lm-eval's own command line with tetra registered as a model: `python -m tetra.eval.lm_eval_main --model tetra
--model_args path=MODEL --tasks ...` accepts every lm_eval option. (lm-eval 0.4 has no plugin entry point that would
let the plain `lm_eval` script find an outside model.)

Entry point: main().
"""

from __future__ import annotations

import tetra.eval.harness  # noqa: F401 - registers "tetra" with lm-eval's model registry


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
