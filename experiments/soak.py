"""A soak run: 4 ranks under torchrun (c10d rendezvous, --max-restarts) for 30 minutes or more, asynchronous
checkpoints every few minutes, a rank SIGKILLed part way, and later the newest checkpoint damaged on disk followed
by another kill. Measures every rank's resident memory over time, the steps each fault cost, and the final loss
against an undisturbed run of the same steps.

Run: python experiments/soak.py [--minutes 30] [--no-reference]
Writes experiments/out/soak/soak.json and rss.png; docs/reliability.md quotes them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tetra.config import dump_toml
from tetra.parallel.launch import free_port
from tetra.train.checkpoint import list_checkpoints
from tetra.train.metrics import read_metrics

OUT = Path(__file__).parent / "out" / "soak"
TETRA = [sys.executable, "-m", "tetra"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="undisturbed training time to plan for")
    parser.add_argument("--checkpoint-minutes", type=float, default=3.0)
    parser.add_argument("--no-reference", action="store_true", help="skip the undisturbed run")
    parser.add_argument("--steps-per-s", type=float, help="this machine's speed, to skip the one-minute calibration")
    return parser.parse_args()


def prepare_data() -> Path:
    data = OUT / "data"
    if not (data / "meta.json").is_file():
        subprocess.run([*TETRA, "tokenizer", "train", "stdlib", "--vocab-size", "2048", "--out", str(OUT / "tok"),
                        "--overwrite"], check=True)
        subprocess.run([*TETRA, "data", "prepare", "stdlib", "--tokenizer", str(OUT / "tok"), "--out", str(data),
                        "--overwrite"], check=True)
    return data


def write_config(data: Path, run_dir: Path, max_steps: int, checkpoint_every: int) -> Path:
    values = {"model": {"hidden_size": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 352,
                        "max_position_embeddings": 128},
              "data": {"path": str(data), "seq_len": 128},
              "train": {"max_steps": max_steps, "batch_size": 4, "lr": 1e-3, "warmup_steps": 50,
                        "precision": "fp32"},
              "eval": {"every": 0, "batches": 4},
              "parallel": {"data": 2, "row": 2, "gemm_layout": "out_in"},
              "run": {"dir": str(run_dir), "log_every": 1, "checkpoint_every": checkpoint_every,
                      "keep_checkpoints": 3, "async_checkpoint": True, "device": "cpu"}}
    path = run_dir.with_suffix(".toml")
    path.write_text(dump_toml(values))
    return path


def launch(config: Path, log: Path) -> subprocess.Popen:
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "4",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"soak-{port}",
               "--max-restarts", "3", "-m", "tetra", "train", str(config), "--no-progress", "--resume", "auto"]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)


def workers(agent: int) -> list[int]:
    """The training processes torchrun started (children of the agent)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == agent:
                found.append(int(entry.name))
    return sorted(found)


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def last_step(run_dir: Path) -> int:
    records = read_metrics(run_dir / "metrics.jsonl")
    return max((r["step"] for r in records), default=0)


def sample_memory(agent: subprocess.Popen, samples: list, start: float) -> None:
    while agent.poll() is None:
        for pid in workers(agent.pid):
            value = rss_mb(pid)
            if value is not None:
                samples.append((time.time() - start, pid, value))
        time.sleep(5)


def calibrate(data: Path) -> float:
    """Steps per second of this grid on this machine, from one minute of training."""
    run_dir = OUT / "calibrate"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    agent = launch(write_config(data, run_dir, 10**6, 0), OUT / "calibrate.log")
    time.sleep(20)
    first, began = last_step(run_dir), time.time()
    time.sleep(45)
    rate = (last_step(run_dir) - first) / (time.time() - began)
    agent.send_signal(signal.SIGTERM)
    agent.wait()
    return rate


def damage_newest(run_dir: Path) -> str:
    newest = list_checkpoints(run_dir)[-1]
    shard = max((p for p in (newest / "shards").iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return str(shard.relative_to(run_dir))


def kill_a_worker(agent: subprocess.Popen, run_dir: Path) -> dict:
    step = last_step(run_dir)
    victim = workers(agent.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    return {"step_at_kill": step, "killed_pid": victim, "time_s": time.time()}


def resumed_step(run_dir: Path, after: float, timeout: float = 600) -> int:
    """The step the restarted group resumed from (run_info.json is rewritten at each start)."""
    info = run_dir / "run_info.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if info.is_file() and info.stat().st_mtime > after:
            source = json.loads(info.read_text())["resumed_from"]
            return int(Path(source).name[5:]) if source not in (None, "None") else 0
        time.sleep(1)
    raise RuntimeError("the job did not restart")


def soak(data: Path, steps: int, checkpoint_every: int) -> dict:
    run_dir = OUT / "soak"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    agent = launch(write_config(data, run_dir, steps, checkpoint_every), OUT / "soak.log")
    start, samples, faults = time.time(), [], []
    sampler = threading.Thread(target=sample_memory, args=(agent, samples, start), daemon=True)
    sampler.start()
    for fraction, damage in ((0.4, False), (0.7, True)):
        while last_step(run_dir) < fraction * steps and agent.poll() is None:
            time.sleep(2)
        fault = {"damaged": damage_newest(run_dir) if damage else None}
        fault.update(kill_a_worker(agent, run_dir))
        fault["resumed_from_step"] = resumed_step(run_dir, fault["time_s"])
        fault["steps_lost"] = fault["step_at_kill"] - fault["resumed_from_step"]
        fault["time_s"] -= start
        faults.append(fault)
        print(f"fault at step {fault['step_at_kill']}: resumed from {fault['resumed_from_step']}", flush=True)
    code = agent.wait()
    sampler.join()
    return {"exit_code": code, "wall_minutes": (time.time() - start) / 60, "faults": faults, "rss": samples,
            "losses": {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}}


def reference(data: Path, steps: int, checkpoint_every: int) -> dict[int, float]:
    run_dir = OUT / "reference"
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    agent = launch(write_config(data, run_dir, steps, checkpoint_every), OUT / "reference.log")
    agent.wait()
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def memory_summary(samples: list) -> dict:
    """Per process: RSS two minutes into its life and at its last sample (growth = leak)."""
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for seconds, pid, value in samples:
        by_pid.setdefault(pid, []).append((seconds, value))
    summary = {}
    for pid, series in by_pid.items():
        settled = [value for seconds, value in series if seconds >= series[0][0] + 120]
        if len(settled) >= 2:
            summary[pid] = {"minutes": (series[-1][0] - series[0][0]) / 60, "settled_mb": settled[0],
                            "last_mb": settled[-1], "growth_mb": settled[-1] - settled[0], "peak_mb": max(settled)}
    return summary


def plot(samples: list, faults: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4), dpi=120)
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for seconds, pid, value in samples:
        by_pid.setdefault(pid, []).append((seconds / 60, value))
    for series in by_pid.values():
        axis.plot(*zip(*series, strict=True), linewidth=1)
    for fault in faults:
        axis.axvline(fault["time_s"] / 60, color="red", linestyle="--", linewidth=1)
    axis.set_xlabel("minutes (red: a rank killed; the second after damaging the newest checkpoint)")
    axis.set_ylabel("resident memory per rank (MiB)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    args = parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    data = prepare_data()
    rate = args.steps_per_s or calibrate(data)
    steps = int(rate * 60 * args.minutes)
    checkpoint_every = max(int(rate * 60 * args.checkpoint_minutes), 1)
    print(f"{rate:.2f} steps/s: {steps} steps, a checkpoint every {checkpoint_every}", flush=True)
    result = {"steps_per_s": rate, "steps": steps, "checkpoint_every": checkpoint_every,
              **soak(data, steps, checkpoint_every)}
    result["memory"] = memory_summary(result["rss"])
    plot(result["rss"], result["faults"], OUT / "rss.png")
    if not args.no_reference:
        expected = reference(data, steps, checkpoint_every)
        got = result["losses"]
        common = sorted(set(expected) & set(got))
        result["reference"] = {"final_loss": expected.get(steps), "soak_final_loss": got.get(steps),
                               "steps_compared": len(common), "max_relative_difference": max(
                                   abs(got[s] - expected[s]) / abs(expected[s]) for s in common)}
    (OUT / "soak.json").write_text(json.dumps({k: v for k, v in result.items() if k != "rss"}, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rss", "losses")}, indent=1))


if __name__ == "__main__":
    main()
