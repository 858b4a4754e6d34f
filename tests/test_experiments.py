"""The experiments' smoke versions run end to end and write their tables."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_catastrophic_memorization_smoke(tmp_path):
    experiment = _load("catastrophic_memorization")
    assert experiment.main(["--smoke", "--work", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["repeated"]) == {"standard", "goldfish k=4"} and len(results["single_pass"]) == 2
    canaries = (tmp_path / "canaries.jsonl").read_text().splitlines()
    assert len(canaries) >= results["scale"]["canaries"] - 2  # a window may be too short once re-tokenized
    for run in results["repeated"].values():
        assert run["canaries"]["documents"] == len(canaries)
        assert 0 <= run["canaries"]["exact_match_rate"] <= 1 and run["held_out_loss"] > 0
    assert "| standard |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "memorization.png").stat().st_size > 1000
    # Held-out documents never reach the training data.
    training = (tmp_path / "repeated.jsonl").read_text()
    controls = [json.loads(line)["text"] for line in (tmp_path / "controls.jsonl").read_text().splitlines()]
    assert not any(json.dumps(text)[1:-1] in training for text in controls)


def test_refusal_tokens_smoke(tmp_path):
    sys.path.insert(0, str(EXPERIMENTS))  # the fine-tuning experiments share sft_common.py
    experiment = _load("refusal_tokens")
    assert experiment.main(["--smoke", "--work", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "refusal_results.json").read_text())
    swept = [row for row in rows if row["tau"] is not None]
    for kind in ("made_up_refused", "real_refused"):  # a higher threshold never refuses more
        assert [row[kind] for row in swept] == sorted((row[kind] for row in swept), reverse=True)
    assert swept[0]["made_up_refused"] == swept[0]["real_refused"] == 1.0  # tau = 0 refuses everything
    assert (tmp_path / "refusal_tokens.png").stat().st_size > 1000


def test_neftune_smoke(tmp_path):
    sys.path.insert(0, str(EXPERIMENTS))
    experiment = _load("neftune")
    assert experiment.main(["--smoke", "--work", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "neftune_results.json").read_text())
    assert [row["alpha"] for row in results["rows"]] == [0.0, 5.0, 10.0]
    assert all(row["held_out_loss"] > 0 and row["mean_answer_tokens"] >= 1 for row in results["rows"])
    assert "| 5 |" in (tmp_path / "neftune_results.md").read_text()
    judged = [row["win_rate_vs_alpha_0"] for row in results["rows"][1:]]
    assert all(0 <= rate["lc_win_rate"] <= 100 and rate["instructions"] == 6 for rate in judged)


def test_jailbreak_defenses_smoke(tmp_path):
    sys.path.insert(0, str(EXPERIMENTS))
    experiment = _load("jailbreak_defenses")
    assert experiment.main(["--smoke", "--work", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "jailbreak_defenses.json").read_text())
    assert [row["target_fpr"] for row in results["detection"]] == [0.01, 0.05, 0.1, 0.2]
    dropped = results["retokenization"]["BPE-dropout p=0.4"]
    assert dropped["prompt_tokens"] > results["retokenization"]["normal"]["prompt_tokens"]
    assert (tmp_path / "jailbreak_defenses.png").stat().st_size > 1000


def test_long_context_quality_smoke(tmp_path):
    sys.path.insert(0, str(EXPERIMENTS))
    experiment = _load("long_context_quality")
    assert experiment.main(["--smoke", "--work", str(tmp_path), "--budgets", "0.1,1.0", "--tasks", "needle,qa"]) == 0
    results = json.loads((tmp_path / "long_context_quality.json").read_text())
    relative = results["relative"]
    assert set(relative) == {"dense", "topk", "loki", "h2o"}
    for kind in ("topk", "loki", "h2o"):  # at a budget of everything each policy is dense attention
        assert relative[kind]["1.0"]["accuracy"] == relative["dense"]["accuracy"]
    assert (tmp_path / "long_context_quality.png").stat().st_size > 1000
    assert "| topk |" in (tmp_path / "long_context_quality.md").read_text()


def test_length_generalization_smoke(tmp_path):
    experiment = _load("length_generalization")
    assert experiment.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["accuracy"]) == {"abacus", "rope", "none", "abacus+loop"}
    assert len(results["accuracy"]["abacus"]) == 15  # 1 .. 5D digits with D = 3
    assert (tmp_path / "length_generalization.png").stat().st_size > 1000
    assert "| 15 |" in (tmp_path / "table.md").read_text()


def test_test_time_compute_smoke(tmp_path):
    experiment = _load("test_time_compute")
    assert experiment.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results_3.json").read_text())  # --smoke trains 3 steps
    assert {"r = 1", "r = 8", "plain, equal parameters", "plain, equal training FLOPs"} <= set(results["accuracy"])
    assert results["adaptive_iterations"] <= 8 and results["flop_ratio"] > 1
    assert (tmp_path / "test_time_compute_3.png").stat().st_size > 1000


def test_scaling_study_smoke(tmp_path):
    experiment = _load("scaling_study")
    assert experiment.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert [fit["runs"] for fit in results["fits"]] == [12, 6, 8] and results["held_out"]["width"] == 32
    assert (tmp_path / "scaling_fit.png").stat().st_size > 10000 and "held-out" in (tmp_path / "table.md").read_text()


def test_lr_study_smoke(tmp_path):
    experiment = _load("lr_study")
    assert experiment.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["points"]) == 4 and all(set(p["losses"]) == {"0.003", "0.01"} for p in results["points"])
    assert "refitted: lr_opt" in (tmp_path / "table.md").read_text()
