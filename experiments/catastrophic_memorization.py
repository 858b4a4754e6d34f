"""Catastrophic memorization on two CPU cores: 100 held-out canary documents, repeated in the training data, are
memorized verbatim with the standard loss and not with the goldfish loss; and after one pass, bigger models memorize
more. Results: docs/memorization.md.

Run: python experiments/catastrophic_memorization.py            (the full experiment, about 45 minutes on 2 cores)
     python experiments/catastrophic_memorization.py --smoke    (a minute; the test suite runs it)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tetra.config import build_run_config
from tetra.data.prepare import prepare_data
from tetra.data.sources import stdlib_files
from tetra.data.tokenizer import TextTokenizer, train_bpe
from tetra.eval.memorization import MemorizationReport, measure_memorization, plot_histogram
from tetra.model.io import load_model
from tetra.train.losses import per_token_loss
from tetra.train.trainer import train

SUFFIX_TOKENS = 50


@dataclass
class Scale:
    """Sizes of one version of the experiment."""

    canaries: int = 100  # held-out documents inserted into the training data
    controls: int = 100  # held-out documents never trained on: the baseline and the held-out loss
    prefix_tokens: int = 64  # each canary is prefix + a 50-token suffix cut from the middle of its file
    repeats: int = 50  # copies of each canary in the training data of the standard-vs-goldfish runs
    steps: int = 1200
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    model: dict = field(default_factory=lambda: {"preset": "tiny"})
    training_files: int = 0  # 0 = every stdlib file that is not held out
    sweep_files: int = 260  # training files of the single-pass runs (one epoch each)
    sweep_models: dict = field(default_factory=lambda: {
        "0.4M": dict(hidden_size=64, n_layers=2, n_heads=2, n_kv_heads=1, intermediate_size=176),
        "1.9M": dict(hidden_size=128, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=352),
        "5.8M": dict(hidden_size=256, n_layers=4, n_heads=4, n_kv_heads=2, intermediate_size=704),
    })
    vocab_size: int = 4096
    held_out_tokens: int = 100_000  # of the control files, for the held-out loss


FULL = Scale()
SMOKE = Scale(canaries=8, controls=8, prefix_tokens=16, repeats=20, steps=30, batch_size=8, seq_len=64, lr=3e-3,
              model={"hidden_size": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "intermediate_size": 64},
              training_files=40, sweep_files=6, vocab_size=512, held_out_tokens=5_000,
              sweep_models={"tiny-a": dict(hidden_size=16, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=32),
                            "tiny-b": dict(hidden_size=32, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=64)})


def held_out_split(canaries: int, controls: int) -> tuple[list[Path], list[Path], list[Path]]:
    """(training files, canary files, control files). Held-out files are 2-40 KB stdlib modules ranked by the
    SHA-256 of their path relative to the stdlib root: a fixed choice, unrelated to their content. The encodings
    package is never held out: its ~100 code-page modules are one generated template, so a held-out one would be
    reproducible from its siblings without being memorized."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    candidates = [path for path in files if 2_000 <= path.stat().st_size <= 40_000
                  and path.relative_to(root).parts[0] != "encodings"]
    ranked = sorted(candidates, key=lambda path: hashlib.sha256(str(path.relative_to(root)).encode()).hexdigest())
    canary_files, control_files = ranked[:canaries], ranked[canaries:canaries + controls]
    held_out = set(canary_files + control_files)
    return [path for path in files if path not in held_out], canary_files, control_files


def middle_window(tokenizer: TextTokenizer, path: Path, length: int) -> str | None:
    """The text of `length` tokens from the middle of a file; None when the window does not survive re-encoding."""
    ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
    start = max(len(ids) // 2 - length // 2, 0)
    text = tokenizer.decode(ids[start:start + length])
    return text if len(tokenizer.encode(text, add_special_tokens=False)) > SUFFIX_TOKENS else None


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return path


def read_texts(paths: list[Path]) -> list[str]:
    return [path.read_text(encoding="utf-8", errors="replace") for path in paths]


def train_run(work: Path, name: str, data: Path, scale: Scale, model: dict, steps: int, goldfish_k: int = 0,
              warmup: int | None = None) -> Path:
    """Train from scratch (same seed for every run) and return the final checkpoint."""
    init = {"preset": model["preset"]} if "preset" in model else {}
    shape = {key: value for key, value in model.items() if key != "preset"}
    values = {"init": init, "model": {**shape, "max_position_embeddings": 1024, "tie_embeddings": True},
              "data": {"path": str(data), "seq_len": scale.seq_len},
              "train": {"max_steps": steps, "batch_size": scale.batch_size, "lr": scale.lr,
                        "warmup_steps": warmup if warmup is not None else max(steps // 20, 1), "schedule": "cosine",
                        "goldfish": {"k": goldfish_k, "context": 13}},
              "eval": {"every": 0}, "run": {"dir": str(work / name), "log_every": max(steps // 10, 1),
                                            "checkpoint_every": 0, "keep_checkpoints": 1}}
    if "preset" in model:
        values["model"] = {}
    started = time.perf_counter()
    result = train(build_run_config(values), values["model"], show_progress=False)
    if result.stopped_by:  # Ctrl-C or SIGTERM: the run saved a checkpoint; stop the whole experiment too
        raise SystemExit(f"stopped by {result.stopped_by} during {name}")
    print(f"  {name}: {steps} steps in {time.perf_counter() - started:.0f} s, final loss {result.last_loss:.3f}",
          flush=True)
    return result.checkpoint


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, documents: list[list[int]], seq_len: int, limit: int) -> float:
    """Mean next-token loss over the first `limit` tokens of documents never trained on."""
    stream = [token for document in documents for token in document][:limit]
    windows = [stream[start:start + seq_len + 1] for start in range(0, len(stream) - seq_len, seq_len)]
    total, count = 0.0, 0
    for start in range(0, len(windows), 16):
        tokens = torch.tensor(windows[start:start + 16])
        losses = per_token_loss(model(tokens[:, :-1]), tokens[:, 1:])
        total, count = total + float(losses.sum()), count + losses.numel()
    return total / count


def evaluate(checkpoint: Path, tokenizer: TextTokenizer, canaries: list[str], controls: list[str],
             control_documents: list[list[int]], scale: Scale) -> dict:
    model = load_model(checkpoint)
    encode = [tokenizer.encode(text, add_special_tokens=False) for text in canaries]
    report = measure_memorization(model, encode, SUFFIX_TOKENS, scale.prefix_tokens)
    baseline = measure_memorization(model, [tokenizer.encode(text, add_special_tokens=False) for text in controls],
                                    SUFFIX_TOKENS, scale.prefix_tokens)
    return {"canaries": report, "controls": baseline,
            "held_out_loss": held_out_loss(model, control_documents, scale.seq_len, scale.held_out_tokens)}


def row(name: str, result: dict) -> str:
    report, baseline = result["canaries"], result["controls"]
    return (f"| {name} | {report.exact_match_rate:.0%} | {report.mean_rouge_l:.3f} | {report.mean_longest_match:.1f} "
            f"| {report.mean_suffix_loss:.2f} | {baseline.exact_match_rate:.0%} | {baseline.mean_rouge_l:.3f} "
            f"| {baseline.mean_suffix_loss:.2f} | {result['held_out_loss']:.3f} |")


HEADER = ("| run | exact match | RougeL | longest match (of 50) | suffix loss | control exact | control RougeL "
          "| control suffix loss | held-out loss |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a one-minute version (the test suite's)")
    parser.add_argument("--work", default="experiments/out/catastrophic_memorization", help="output folder")
    args = parser.parse_args(argv)
    scale = SMOKE if args.smoke else FULL
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    started = time.perf_counter()

    training_files, canary_files, control_files = held_out_split(scale.canaries, scale.controls)
    if scale.training_files:
        training_files = training_files[:: max(len(training_files) // scale.training_files, 1)][:scale.training_files]
    training_texts = read_texts(training_files)
    print(f"{len(training_files)} training files, {len(canary_files)} canaries, {len(control_files)} controls",
          flush=True)
    tokenizer = train_bpe(training_texts, scale.vocab_size)  # held-out files do not shape the vocabulary
    tokenizer.save(work / "tokenizer")
    length = scale.prefix_tokens + SUFFIX_TOKENS
    canaries = [text for path in canary_files if (text := middle_window(tokenizer, path, length))]
    controls = [text for path in control_files if (text := middle_window(tokenizer, path, length))]
    write_jsonl(work / "canaries.jsonl", canaries)
    write_jsonl(work / "controls.jsonl", controls)
    control_documents = [tokenizer.encode(text, add_special_tokens=False) for text in read_texts(control_files)]

    # Standard vs goldfish: the canaries repeated among all the training text, in a fixed shuffled order.
    documents = training_texts + canaries * scale.repeats
    random.Random(0).shuffle(documents)
    data = work / "data-repeated"
    prepare_data(str(write_jsonl(work / "repeated.jsonl", documents)), work / "tokenizer", data, val_fraction=0,
                 overwrite=True, show_progress=False)
    results = {}
    for name, goldfish_k in (("standard", 0), ("goldfish k=4", 4)):
        checkpoint = train_run(work, name.split()[0], data, scale, scale.model, scale.steps, goldfish_k)
        results[name] = evaluate(checkpoint, tokenizer, canaries, controls, control_documents, scale)
    plot_histogram({name: result["canaries"] for name, result in results.items()}, work / "memorization.png")

    # One pass over the canaries, as the model grows.
    sweep_texts = training_texts[:: max(len(training_texts) // scale.sweep_files, 1)][:scale.sweep_files]
    single = sweep_texts + canaries
    random.Random(1).shuffle(single)
    sweep_data = work / "data-single-pass"
    meta = prepare_data(str(write_jsonl(work / "single.jsonl", single)), work / "tokenizer", sweep_data,
                        val_fraction=0, overwrite=True, show_progress=False)
    one_epoch = (meta["splits"]["train"]["tokens"] - 1) // scale.seq_len // scale.batch_size
    sweep = {}
    for name, shape in scale.sweep_models.items():
        checkpoint = train_run(work, f"single-{name}", sweep_data, scale, shape, one_epoch)
        sweep[name] = evaluate(checkpoint, tokenizer, canaries, controls, control_documents, scale)

    minutes = (time.perf_counter() - started) / 60
    lines = [f"## Repeated canaries ({scale.repeats} copies each, {scale.steps} steps, "
             f"{scale.batch_size} x {scale.seq_len} tokens per step)", "", HEADER,
             *(row(name, result) for name, result in results.items()), "",
             f"## One pass over the canaries ({one_epoch} steps = one epoch of {len(sweep_texts)} training files "
             f"plus the canaries once)", "", HEADER.replace("| run |", "| parameters |"),
             *(row(name, result) for name, result in sweep.items()), "",
             f"Whole experiment: {minutes:.1f} minutes."]
    (work / "results.md").write_text("\n".join(lines) + "\n")
    serializable = {group: {name: {key: (value.summary() if isinstance(value, MemorizationReport) else value)
                                   for key, value in result.items()} for name, result in runs.items()}
                    for group, runs in (("repeated", results), ("single_pass", sweep))}
    (work / "results.json").write_text(json.dumps({"scale": asdict(scale), **serializable,
                                                   "minutes": minutes}, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
