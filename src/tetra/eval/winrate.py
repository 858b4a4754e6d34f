"""The win-rate pipeline: pair model and baseline outputs by instruction, have a judge compare every pair in both
orders (concurrently, so a batching server is kept busy), save the annotations, fit the length-controlled GLM.

Entry points: read_outputs(path), pair_outputs(model, baseline), judge_pairs(ask, pairs), win_rates(annotations).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tetra.errors import DataError
from tetra.eval.judge import Ask, swapped_preference
from tetra.eval.winrate_glm import WinRates, fit_win_rates


@dataclass
class Annotation:
    """One judged pair."""

    instruction: str
    preference: float  # 1 = the model's answer is better
    position_bias: float
    model_length: int
    baseline_length: int


def read_outputs(path: str | Path) -> dict[str, str]:
    """{instruction: output} from AlpacaEval-style JSON lines ({"instruction": ..., "output": ...}) or a JSON list."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Outputs file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise DataError(f"{path} is not JSON lines ({error}). Each line should be "
                        '{"instruction": "...", "output": "..."}.') from None
    outputs = {}
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) or \
                not isinstance(record.get("output"), str):
            raise DataError(f"{path} record {number} lacks a string 'instruction' and 'output'.")
        outputs[record["instruction"]] = record["output"]
    if not outputs:
        raise DataError(f"{path} holds no records.")
    return outputs


def pair_outputs(model: dict[str, str], baseline: dict[str, str]) -> list[tuple[str, str, str]]:
    """(instruction, model output, baseline output) for every instruction both files answer; all must match."""
    missing = [instruction for instruction in model if instruction not in baseline]
    extra = [instruction for instruction in baseline if instruction not in model]
    if missing or extra:
        raise DataError(f"The two outputs files answer different instructions: {len(missing)} only in the model's "
                        f"(first: {missing[:1]}), {len(extra)} only in the baseline's (first: {extra[:1]}). "
                        "Generate both from the same instruction list.")
    return [(instruction, output, baseline[instruction]) for instruction, output in model.items()]


def judge_pairs(ask: Ask, pairs: list[tuple[str, str, str]], concurrency: int = 8) -> list[Annotation]:
    def one(pair: tuple[str, str, str]) -> Annotation:
        instruction, model_output, baseline_output = pair
        preference, bias = swapped_preference(ask, instruction, model_output, baseline_output)
        return Annotation(instruction, preference, bias, len(model_output), len(baseline_output))

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(pool.map(one, pairs))


def save_annotations(annotations: list[Annotation], path: str | Path) -> None:
    Path(path).write_text("".join(json.dumps(asdict(a)) + "\n" for a in annotations), encoding="utf-8")


def win_rates(annotations: list[Annotation]) -> WinRates:
    return fit_win_rates([a.preference for a in annotations],
                         [a.model_length - a.baseline_length for a in annotations])
