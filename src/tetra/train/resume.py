"""Which checkpoint a run continues from: --resume auto takes the newest one that passes its manifest (warning
about each newer one it passes over, by name); an explicit folder must pass it too.

Entry points: check_resume_request (before anything is built) and choose_checkpoint (every rank, once the process
group exists: rank 0 reads and hashes, the others receive its answer, so all ranks load the same folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from tetra.errors import CheckpointError, TetraError
from tetra.train.checkpoint import checkpoint_problems, latest_checkpoint, newest_sound_checkpoint


def check_resume_request(resume: str | None, run_dir: Path) -> None:
    """Refuse a fresh run into a used folder, and an explicit checkpoint folder that does not exist."""
    if not resume:
        if (run_dir / "metrics.jsonl").exists() or latest_checkpoint(run_dir):
            raise TetraError(f"{run_dir} already holds a run. Continue it with --resume auto, or start a new one "
                             "in another folder (run.dir=...) or after removing this one.")
    elif resume != "auto" and not Path(resume).is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint folder. Use --resume auto to take the newest "
                              f"checkpoint under {run_dir / 'checkpoints'}.")


def _choose(resume: str | None, run_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume != "auto":
        problems = checkpoint_problems(Path(resume))
        if problems:
            raise CheckpointError(f"--resume {resume}: the checkpoint is damaged or incomplete: "
                                  f"{'; '.join(problems[:4])}. Resume from an older checkpoint, or with --resume "
                                  "auto, which takes the newest sound one.")
        return Path(resume)
    chosen, skipped = newest_sound_checkpoint(run_dir)
    for folder, problems in skipped.items():
        sys.stderr.write(f"warning: skipping checkpoint {folder}: {'; '.join(problems[:4])}\n")
    if skipped and chosen is None:
        raise CheckpointError(f"--resume auto: every checkpoint under {run_dir / 'checkpoints'} is damaged or "
                              "incomplete (see the warnings above); nothing sound is left to resume from. Start "
                              "the run again in a new folder.")
    if skipped:
        sys.stderr.write(f"warning: resuming from the newest sound checkpoint, {chosen}\n")
    return chosen


def choose_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """The folder to load (None: start fresh); the same on every rank."""
    if not dist.is_initialized():
        return _choose(resume, run_dir)
    answer: list[object] = [None]
    if dist.get_rank() == 0:
        try:
            answer[0] = ("ok", _choose(resume, run_dir))
        except CheckpointError as error:
            answer[0] = ("error", str(error))
    dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]  # type: ignore[misc]
    if kind == "error":
        raise CheckpointError(str(value))
    return value  # type: ignore[return-value]
