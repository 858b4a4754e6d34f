"""Scaling-law science: the approach-3 fit recovers a known law and its compute-optimal allocation from noisy
synthetic losses, bootstrap intervals cover the truth near their nominal rate, the step law's numbers, the refitted
learning-rate law, sweeps (a cooldown branch equals a full WSD run, reruns skip finished runs), the fit command
with --exclude, and bad sweep files named field by field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tetra.cli import main
from tetra.errors import ConfigError
from tetra.science.hparams import fit_learning_rate_law, step_law
from tetra.science.scaling_fit import ScalingLaw, bootstrap, fit_law, grid_of_starts, intervals
from tetra.science.sweep import load_sweep, run_sweep

CHINCHILLA = ScalingLaw(("params", "tokens"), 1.69, (406.4, 410.7), (0.34, 0.28))


def _synthetic(law: ScalingLaw, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = np.repeat(np.geomspace(1e7, 1e9, 8), 4)
    tokens = np.tile(np.geomspace(1e9, 1e11, 4), 8)
    features = np.stack([params, tokens], 1)
    return features, law.predict(features) * np.exp(rng.normal(0, noise, len(params)))


def test_the_fit_recovers_a_known_law_and_its_compute_optimal_allocation():
    features, losses = _synthetic(CHINCHILLA, 0.003, seed=0)
    law = fit_law(features, losses, CHINCHILLA.names, starts=grid_of_starts(2, limit=300))
    assert abs(law.alpha[0] - 0.34) < 0.03 and abs(law.alpha[1] - 0.28) < 0.03
    assert abs(law.E - 1.69) / 1.69 < 0.02
    assert np.abs(law.predict(features) / CHINCHILLA.predict(features) - 1).max() < 0.01
    for budget in (1e20, 1e22):
        params, tokens = law.compute_optimal(budget)
        true_params, _ = CHINCHILLA.compute_optimal(budget)
        assert abs(np.log(params / true_params)) < np.log(1.3) and abs(6 * params * tokens / budget - 1) < 1e-9
    # the closed form is the minimum of L along 6 N D = C
    sizes = np.geomspace(1e8, 1e11, 2000)
    along = CHINCHILLA.predict(np.stack([sizes, 1e22 / (6 * sizes)], 1))
    assert abs(np.log(sizes[along.argmin()] / CHINCHILLA.compute_optimal(1e22)[0])) < 0.01


def test_the_width_depth_law_is_recovered():
    truth = ScalingLaw(("width", "depth", "tokens"), 2.0, (30.0, 2.0, 300.0), (0.6, 0.5, 0.3))
    grid = np.array([(w, d, t) for w in (64, 128, 256, 512) for d in (2, 4, 8) for t in (1e8, 4e8, 1.6e9)])
    losses = truth.predict(grid) * np.exp(np.random.default_rng(4).normal(0, 0.002, len(grid)))
    law = fit_law(grid, losses, truth.names, starts=grid_of_starts(3, limit=1500))
    assert np.allclose(law.alpha, truth.alpha, atol=0.06) and abs(law.E - 2.0) < 0.05
    assert np.abs(law.predict(grid) / truth.predict(grid) - 1).max() < 0.005
    with pytest.raises(ConfigError, match="compute-optimal"):
        law.compute_optimal(1e20)


@pytest.mark.slow
def test_bootstrap_intervals_cover_the_truth_near_their_nominal_rate():
    covered = []
    for seed in range(12):
        features, losses = _synthetic(CHINCHILLA, 0.01, seed=100 + seed)
        law = fit_law(features, losses, CHINCHILLA.names, starts=CHINCHILLA.vector()[None])
        bounds = intervals(bootstrap(features, losses, law, resamples=40, seed=seed), level=0.9)
        covered.append(bounds["alpha_params"][0] <= 0.34 <= bounds["alpha_params"][1])
    assert np.mean(covered) >= 0.7, covered  # nominal 0.9; percentile intervals of 32 runs run a little short


def test_step_law_numbers():
    hparams = step_law(1e9, 1e11)
    assert hparams.lr == pytest.approx(1.79 * 1e9**-0.713 * 1e11**0.307) and hparams.lr == pytest.approx(1.6325e-3,
                                                                                                        rel=1e-3)
    assert hparams.batch_tokens == pytest.approx(0.58 * 1e11**0.571) and hparams.batch_sequences(4096) == 270
    with pytest.raises(ConfigError, match="--params"):
        step_law(0, 1e9)


def test_the_learning_rate_law_refits_to_a_sweep():
    rows = []
    for n in (1e6, 4e6, 1.6e7):
        for d in (1e8, 4e8):
            best = 0.5 * n**-0.6 * d**0.3
            rows += [{"non_embedding_params": n, "tokens": d, "lr": best * f, "loss": 3 + abs(np.log(f))}
                     for f in (0.5, 1.0, 2.0)]
    law = fit_learning_rate_law(rows)
    assert law.params_exponent == pytest.approx(-0.6, abs=1e-6) and law.tokens_exponent == pytest.approx(0.3, abs=1e-6)
    with pytest.raises(ConfigError, match="several learning rates"):
        fit_learning_rate_law([row for row in rows if row["lr"] == rows[1]["lr"]])


def _sweep_files(tmp_path, cooldowns: bool = True, extra: str = "") -> tuple:
    data = tmp_path / "data"
    if not data.exists():
        assert main(["data", "arithmetic", "--max-digits", "3", "--examples", "600", "--out", str(data)]) == 0
    base = tmp_path / "base.toml"
    base.write_text(f'[data]\npath = "{data}"\nseq_len = 32\n[model]\nhidden_size = 16\nn_layers = 1\nn_heads = 2\n'
                    '[train]\nbatch_size = 4\nwarmup_steps = 2\nlr = 3e-3\nprecision = "fp32"\n[run]\nlog_every = 1\n')
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(f'[sweep]\nbase = "{base}"\nout = "{tmp_path / "sweep"}"\nwidths = [16, 32]\ndepths = [1]\n'
                     f'head_width = 8\ntokens = [768, 1280]\ncooldowns = {str(cooldowns).lower()}\n'
                     f'cooldown_fraction = 0.5\n{extra}')
    return base, sweep


def test_a_cooldown_branch_equals_a_full_wsd_run_and_reruns_skip_finished_runs(tmp_path):
    from tetra.config import load_run_config
    from tetra.train.trainer import train

    base, sweep = _sweep_files(tmp_path)
    started = []

    def counting_train(config, model, resume):
        started.append((config.run.dir, resume))
        return train(config, model, resume, show_progress=False)

    rows = run_sweep(sweep, counting_train, log=lambda line: None)
    # per width: stable to 4 steps, stable on to 6 (resumed), cooldowns to 6 and 10 steps (768 and 1280 tokens)
    assert len(started) == 8 and len(rows) == 4
    assert {row["steps"] for row in rows} == {6, 10} and {row["width"] for row in rows} == {16, 32}
    assert all(row["tokens"] == row["steps"] * 4 * 32 and row["flops"] == 6 * row["non_embedding_params"] *
               row["tokens"] for row in rows)
    full = tmp_path / "full"
    config, model = load_run_config(base, ["model.hidden_size=32", "model.n_heads=4", "train.schedule=wsd",
                                           "train.decay_fraction=0.5", "train.max_steps=10", f"run.dir={full}",
                                           "eval.every=0"])
    train(config, model, None, show_progress=False)
    straight = [json.loads(line)["loss"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    branch = tmp_path / "sweep" / "w32-d1-lr0.003" / "cooldown-10" / "metrics.jsonl"
    assert [json.loads(line)["loss"] for line in branch.read_text().splitlines()] == straight[6:]
    started.clear()
    assert run_sweep(sweep, counting_train, log=lambda line: None) == rows and not started
    finished = tmp_path / "sweep" / "w16-d1-lr0.003" / "cooldown-6"
    import shutil

    shutil.rmtree(finished)  # as if interrupted before this cooldown began
    assert run_sweep(sweep, counting_train, log=lambda line: None) == rows
    assert [str(finished)] == [run_dir for run_dir, _ in started]


def test_the_fit_command_writes_the_law_intervals_and_plots(tmp_path, capsys):
    features, losses = _synthetic(CHINCHILLA, 0.003, seed=3)
    rows = [{"run": str(i), "width": 0, "depth": 0, "non_embedding_params": n, "params": n, "tokens": d,
             "flops": 6 * n * d, "loss": loss, "lr": 1e-3}
            for i, ((n, d), loss) in enumerate(zip(features, losses, strict=True))]
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "sweep.json").write_text(json.dumps(rows))
    assert main(["scaling", "fit", str(folder), "--bootstrap", "20", "--budget", "1e21", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert abs(report["parameters"]["alpha_params"] - 0.34) < 0.03 and report["runs"] == 32
    assert report["compute_optimal"][0]["flops"] == 1e21 and (folder / "fit.png").stat().st_size > 10000
    low, high = report["intervals_95"]["alpha_tokens"]
    assert low < report["parameters"]["alpha_tokens"] < high
    assert main(["scaling", "fit", str(folder), "--bootstrap", "0", "--exclude", "non_embedding_params<5e7",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == 20
    assert main(["scaling", "fit", str(folder), "--exclude", "size<3"]) == 2
    assert "column 'size'" in capsys.readouterr().err
    assert main(["scaling", "fit", str(tmp_path / "nowhere")]) == 2


def test_bad_sweep_files_are_named_field_by_field(tmp_path, capsys):
    _, sweep = _sweep_files(tmp_path)
    sweep.write_text('[sweep]\nbase = ""\nwidths = [48, -16]\ndepths = []\nhead_width = 32\ntokens = "many"\n'
                     'cooldown_fraction = 1.5\nwidht = 3\n')
    with pytest.raises(ConfigError) as error:
        load_sweep(sweep)
    assert "sweep.tokens = 'many' has the wrong type" in str(error.value) and "did you mean sweep.width" in \
        str(error.value)
    sweep.write_text('[sweep]\nbase = ""\nwidths = [48, -16]\ndepths = []\nhead_width = 32\ntokens = [1e6]\n'
                     'cooldown_fraction = 1.5\n')
    with pytest.raises(ConfigError) as error:
        load_sweep(sweep)
    for expected in ("sweep.base is empty", "sweep.depths is empty", "sweep.widths = [48, -16]",
                     "48 is not a multiple of sweep.head_width", "cooldown_fraction must be in (0, 1)"):
        assert expected in str(error.value)
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_runs_are_shared_out_in_whole_groups_of_about_equal_steps():
    from tetra.science.sweep import PlannedRun, share_runs

    runs = [PlannedRun(f"{group}/{part}", [], None, steps, None)
            for group, sizes in (("a", (10, 12)), ("b", (4,)), ("c", (6, 6)), ("d", (3, 3)))
            for part, steps in enumerate(sizes)]
    shares = [share_runs(runs, rank, 2) for rank in range(2)]
    assert sorted(run.name for share in shares for run in share) == sorted(run.name for run in runs)
    groups = [{run.name.split("/")[0] for run in share} for share in shares]
    assert groups == [{"a"}, {"b", "c", "d"}]  # 22 steps against 4 + 12 + 6
    assert [run.name for run in shares[1]] == [run.name for run in runs if run.name[0] in "bcd"]  # sweep order
    assert share_runs(runs, 0, 1) == runs


def test_a_sweep_under_torchrun_trains_runs_side_by_side_with_one_processs_results(tmp_path):
    """Two processes each train one width's runs; the table equals the one a single process writes."""
    import subprocess
    import sys

    from tetra.parallel.launch import free_port
    from tetra.train.trainer import train

    _, sweep = _sweep_files(tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "tetra", "sweep", str(sweep)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = {line.split(":")[0] for line in result.stdout.splitlines() if "training to step" in line}
    assert ranks == {"rank 0", "rank 1"}, result.stdout
    side_by_side = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    import shutil

    shutil.move(tmp_path / "sweep", tmp_path / "sweep-torchrun")
    alone = run_sweep(sweep, lambda config, model, resume: train(config, model, resume, show_progress=False),
                      log=lambda line: None)
    assert side_by_side == alone and len(alone) == 4


def test_a_stopped_process_ends_the_sweep_instead_of_a_wait_forever(tmp_path):
    """Process 0 waits for the other processes' runs, but not for a process that stopped (a failure or a signal):
    it says which and how to continue. A run stopped by a signal ends its process's share too."""
    from types import SimpleNamespace

    from tetra.errors import TetraError

    _, sweep = _sweep_files(tmp_path)
    out = tmp_path / "sweep"

    def pretend_train(config, model, resume, stopped_by=None):
        run_dir = Path(config.run.dir)
        (run_dir / "checkpoints" / f"step-{config.train.max_steps:07d}").mkdir(parents=True)
        return SimpleNamespace(stopped_by=stopped_by)

    def peer_stops_meanwhile(config, model, resume):
        result = pretend_train(config, model, resume)
        (out / ".stopped-rank-1").write_text("w32-d1-lr0.003/stable failed: OSError: disk full")
        return result

    with pytest.raises(TetraError, match="process 1 stopped .*disk full.* Run the sweep again"):
        run_sweep(sweep, peer_stops_meanwhile, log=lambda line: None, share=(0, 2), poll_seconds=0.01)
    lines = []
    assert run_sweep(sweep, lambda *a: pretend_train(*a, stopped_by="SIGTERM"), log=lines.append, share=(1, 2)) == []
    assert "stopped by SIGTERM" in lines[-1] and "SIGTERM" in (out / ".stopped-rank-1").read_text()
    assert not (out / "sweep.json").exists()


def test_the_best_rate_between_grid_points_comes_from_a_parabola_in_log_lr():
    """Losses of a parabola in log(lr) sampled 3x apart give back its minimum, not the nearest sampled rate; a best
    rate at the grid's edge stays the sampled one."""
    from tetra.science.hparams import best_learning_rates

    true_best = 2e-3
    rows = [{"non_embedding_params": 1e6, "tokens": 1e8, "lr": lr, "loss": 3 + (np.log(lr / true_best)) ** 2}
            for lr in (1e-3, 3e-3, 1e-2)]
    rows += [{"non_embedding_params": 2e6, "tokens": 1e8, "lr": lr, "loss": loss}
             for lr, loss in ((1e-3, 3.0), (3e-3, 3.2), (1e-2, 3.5))]
    (_, _, interpolated), (_, _, edge) = best_learning_rates(rows)
    assert interpolated == pytest.approx(true_best, rel=1e-9) and edge == 1e-3
