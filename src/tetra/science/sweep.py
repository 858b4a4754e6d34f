"""`tetra sweep`: a grid of model shapes (width x depth, heads from width) x token budgets x learning rates on one
corpus, each point an ordinary tetra run folder, recorded in one table (sweep.csv, sweep.json) for the fits.

With cooldowns on (the Gemstones recipe), each (shape, learning rate) trains once: a warmup-stable run whose
checkpoint at every budget's cooldown start is branched into a short linear cooldown to that budget, exactly the
WSD schedule a run of that length would have had (`train.schedule = "wsd"`). One stable run so gives a point per
budget for about the cost of the longest. Without cooldowns every point is a full run with the base config's own
schedule. The sweep is resumable: a run whose final checkpoint exists is skipped, so an interrupted sweep run again
finishes only what is missing.

Under torchrun (`torchrun --nproc-per-node N -m tetra sweep SWEEP.toml`) the N processes train runs side by side,
each run on one process: every (shape, learning rate) group (a stable run and its cooldowns, which depend on it)
goes whole to one process, groups dealt out so each process gets about the same number of steps. Process 0 writes
the table once every run is finished.

Entry points: SweepConfig, load_sweep(path), plan_runs(sweep, base), share_runs(runs, rank, world),
run_sweep(path, train, share=(rank, world)) -> the table's rows.
"""

from __future__ import annotations

import csv
import json
import shutil
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tetra.config import RunConfig, build_section, load_run_config, read_toml
from tetra.errors import ConfigError, TetraError
from tetra.model.config import ModelConfig

TABLE_COLUMNS = ("run", "width", "depth", "heads", "lr", "tokens", "steps", "params", "non_embedding_params",
                 "flops", "loss", "train_loss")


@dataclass
class SweepSection:
    """The grid and how each point trains."""

    base: str = ""  # a `tetra train` config every run starts from (data, seq_len, batch, precision, ...)
    out: str = "runs/sweep"  # the sweep folder: one run folder per point, sweep.csv and sweep.json
    widths: list[int] = field(default_factory=list)  # model widths (hidden sizes)
    depths: list[int] = field(default_factory=list)  # block counts
    head_width: int = 64  # heads = width / head_width
    tokens: list[float] = field(default_factory=list)  # training-token budgets (rounded to whole steps)
    lrs: list[float] = field(default_factory=list)  # peak learning rates (default: the base config's)
    cooldowns: bool = True  # one warmup-stable run per shape and lr, a cooldown branch per budget
    cooldown_fraction: float = 0.2  # the cooldown's share of a budget's steps
    overrides: list[str] = field(default_factory=list)  # dotted overrides for every run ("train.batch_size=16")


@dataclass
class SweepConfig:
    sweep: SweepSection = field(default_factory=SweepSection)

    def problems(self) -> list[str]:
        s = self.sweep
        found = [] if s.base else ["sweep.base is empty: name the `tetra train` config every run starts from"]
        for name in ("widths", "depths", "tokens"):
            values = getattr(s, name)
            if not values:
                found.append(f"sweep.{name} is empty: list at least one value")
            elif any(v <= 0 for v in values):
                found.append(f"sweep.{name} = {values}: every value must be positive")
        if any(lr <= 0 for lr in s.lrs):
            found.append(f"sweep.lrs = {s.lrs}: every learning rate must be positive")
        if s.head_width <= 0:
            found.append(f"sweep.head_width must be positive (got {s.head_width})")
        else:
            found += [f"sweep.widths: {w} is not a multiple of sweep.head_width = {s.head_width} (heads = width / "
                      "head_width)" for w in s.widths if w % s.head_width]
        if not 0 < s.cooldown_fraction < 1:
            found.append(f"sweep.cooldown_fraction must be in (0, 1) (got {s.cooldown_fraction})")
        return found


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and check a sweep file; every problem is named in one error."""
    path = Path(path)
    config, problems = build_section(SweepConfig, read_toml(path, "Sweep file", "docs/scaling.md"))
    problems += config.problems() if not problems else []
    if problems:
        raise ConfigError(f"Invalid sweep file {path}:\n  - " + "\n  - ".join(problems))
    base = Path(config.sweep.base)
    if not base.is_absolute() and not base.is_file():
        config.sweep.base = str(path.parent / base)  # relative to the sweep file when not to the working folder
    return config


@dataclass
class PlannedRun:
    """One `tetra train` invocation of the sweep."""

    name: str  # folder under the sweep's out
    overrides: list[str]
    resume_from: str | None  # a checkpoint to branch from (a cooldown), or None
    steps: int
    point: dict[str, Any] | None  # the table row's settings when this run gives a point (stable segments do not)


def _steps(tokens: float, base: RunConfig) -> int:
    per_step = base.train.batch_size * base.train.grad_accum * base.data.seq_len
    return max(1, round(tokens / per_step))


def plan_runs(sweep: SweepSection, base: RunConfig) -> list[PlannedRun]:
    """Every training invocation in order: per shape and lr, the stable segments then the cooldowns (or one full
    run per budget)."""
    runs = []
    warmup = base.train.warmup_steps
    for width in sweep.widths:
        for depth in sweep.depths:
            for lr in sweep.lrs or [base.train.lr]:
                shape = f"w{width}-d{depth}-lr{lr:g}"
                model = [f"model.hidden_size={width}", f"model.n_layers={depth}",
                         f"model.n_heads={width // sweep.head_width}", "model.n_kv_heads=0", f"train.lr={lr}"]
                budgets = sorted({_steps(t, base) for t in sweep.tokens})
                for steps in budgets:
                    point = {"width": width, "depth": depth, "heads": width // sweep.head_width, "lr": lr,
                             "steps": steps}
                    if not sweep.cooldowns:
                        runs.append(PlannedRun(f"{shape}/steps-{steps}", model + [f"train.max_steps={steps}"], None,
                                               steps, point))
                        continue
                    if steps <= warmup:
                        raise ConfigError(f"A budget of {steps} steps is within the warmup ({warmup} steps); raise "
                                          "the smallest sweep.tokens or lower train.warmup_steps in the base config.")
                    stable = warmup + round((1 - sweep.cooldown_fraction) * (steps - warmup))
                    runs.append(PlannedRun(f"{shape}/stable", model + ["train.schedule=constant",
                                                                      f"train.max_steps={stable}"], "auto", stable,
                                           None))
                    runs.append(PlannedRun(
                        f"{shape}/cooldown-{steps}",
                        model + ["train.schedule=wsd", f"train.decay_fraction={sweep.cooldown_fraction}",
                                 f"train.max_steps={steps}"],
                        f"{shape}/stable/checkpoints/step-{stable:07d}", steps, point))
    return sorted(runs, key=lambda run: (run.name.split("/")[0], run.point is not None, run.steps))


def _finished(run_dir: Path, steps: int) -> bool:
    return (run_dir / "checkpoints" / f"step-{steps:07d}").is_dir()


def _resume_argument(run: PlannedRun, run_dir: Path, out: Path) -> str | None:
    """--resume for a run about to train: its own newest checkpoint when it has one; else the stable checkpoint
    a cooldown branches from (or nothing), after clearing what an interrupted start left without a checkpoint."""
    if any((run_dir / "checkpoints").glob("step-*")):
        return "auto"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    return None if run.resume_from in (None, "auto") else str(out / run.resume_from)


def _row(run: PlannedRun, run_dir: Path, base: RunConfig) -> dict[str, Any]:
    """The table row of a finished run: sizes from the model it built, losses from its metrics."""
    built = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    model = ModelConfig.from_dict(built["model"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = [r for r in records if r.get("step") == run.steps]
    validation = [r["val_loss"] for r in final if "val_loss" in r]
    tokens = run.steps * base.train.batch_size * base.train.grad_accum * base.data.seq_len
    non_embedding = model.num_parameters(include_embeddings=False)
    train_loss = final[-1]["loss"] if final else records[-1]["loss"]
    return {"run": run.name, **run.point, "tokens": tokens, "params": model.num_parameters(),
            "non_embedding_params": non_embedding, "flops": 6.0 * non_embedding * tokens,
            "loss": validation[-1] if validation else train_loss, "train_loss": train_loss}


def write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "sweep.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")


def read_table(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of a sweep folder's sweep.json (or a table file given directly)."""
    path = Path(folder)
    path = path / "sweep.json" if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: point at a folder written by `tetra sweep` (it holds sweep.json).")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON ({error}); rerun `tetra sweep` to rewrite it.") from None
    missing = [c for c in ("non_embedding_params", "tokens", "loss") if rows and c not in rows[0]]
    if not isinstance(rows, list) or missing:
        raise ConfigError(f"{path} is not a sweep table (missing {', '.join(missing) or 'rows'}).")
    return rows


def _mark_stopped(out: Path, rank: int, reason: str) -> None:
    """Leave word for process 0 (which waits for every run) that this process will not finish its share."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f".stopped-rank-{rank}").write_text(reason, encoding="utf-8")


def _raise_if_a_peer_stopped(out: Path, since: float) -> None:
    """Process 0's wait ends when another process of this sweep (a mark newer than its start) stopped: under
    torchrun a failure stops every process anyway, under srun it does not."""
    for mark in sorted(out.glob(".stopped-rank-*")):
        if mark.stat().st_mtime >= since:
            raise TetraError(f"The sweep's process {mark.name.rsplit('-', 1)[1]} stopped ("
                             f"{mark.read_text(encoding='utf-8')}), so its runs will not finish. Run the sweep "
                             "again: finished runs are skipped and interrupted ones resume.")


def share_runs(runs: list[PlannedRun], rank: int, world: int) -> list[PlannedRun]:
    """This process's runs when `world` processes train side by side: whole (shape, lr) groups, the largest first,
    each to the process with the fewest steps so far (ties to the lowest rank), in the sweep's order."""
    groups: dict[str, list[PlannedRun]] = {}
    for run in runs:
        groups.setdefault(run.name.split("/")[0], []).append(run)
    load, owner = [0] * world, {}
    for name, members in sorted(groups.items(), key=lambda item: -sum(run.steps for run in item[1])):
        target = min(range(world), key=lambda index: (load[index], index))
        owner[name] = target
        load[target] += sum(run.steps for run in members)
    return [run for run in runs if owner[run.name.split("/")[0]] == rank]


def run_sweep(path: str | Path, train: Callable[[RunConfig, dict, str | None], Any],
              log: Callable[[str], None] = print, share: tuple[int, int] = (0, 1),
              poll_seconds: float = 5.0) -> list[dict[str, Any]]:
    """Train every missing run of the sweep (train(config, explicit_model, resume) is the trainer's entry
    point), then write and return the table. share = (rank, world): train only this process's share of the runs
    (share_runs); rank 0 then waits for the others' runs to finish and writes the table, other ranks return []."""
    sweep = load_sweep(path).sweep
    base, _ = load_run_config(sweep.base, sweep.overrides)
    out = Path(sweep.out)
    runs = plan_runs(sweep, base)
    rank, world = share
    mine = {run.name for run in share_runs(runs, rank, world)}
    prefix = f"rank {rank}: " if world > 1 else ""
    started = time.time()
    for index, run in enumerate(runs, 1):
        if run.name not in mine:
            continue
        run_dir = out / run.name
        if _finished(run_dir, run.steps):
            log(f"{prefix}[{index}/{len(runs)}] {run.name}: done, skipped")
            continue
        log(f"{prefix}[{index}/{len(runs)}] {run.name}: training to step {run.steps}")
        overrides = [*sweep.overrides, *run.overrides, f"run.dir={run_dir}", "run.checkpoint_every=0",
                     "run.keep_checkpoints=1000", "eval.every=0"]
        config, explicit_model = load_run_config(sweep.base, overrides)
        try:
            result = train(config, explicit_model, _resume_argument(run, run_dir, out))
        except BaseException as error:
            _mark_stopped(out, rank, f"{run.name} failed: {type(error).__name__}: {error}")
            raise
        if getattr(result, "stopped_by", None):  # a signal: the run saved where it was; so does the sweep
            _mark_stopped(out, rank, f"{run.name} stopped by {result.stopped_by}")
            log(f"{prefix}stopped by {result.stopped_by}; run the sweep again to finish it")
            return []
    if rank != 0:
        return []
    waiting = [run for run in runs if not _finished(out / run.name, run.steps)]
    if waiting:
        log(f"waiting for {len(waiting)} runs on the other processes")
    while waiting:
        _raise_if_a_peer_stopped(out, started)
        time.sleep(poll_seconds)
        waiting = [run for run in waiting if not _finished(out / run.name, run.steps)]
    rows = [_row(run, out / run.name, base) for run in runs if run.point is not None]
    write_table(out, rows)
    return rows
