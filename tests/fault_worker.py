"""`tetra ...` with faults injected from outside, for the reliability tests (run it with python or torchrun in
place of `-m tetra`). Environment variables choose the fault:

- TETRA_FAULT_NAN="STEP:RANK": the loss of that step (0-based) turns NaN on that rank only.
- TETRA_FAULT_KILL="SAVE_STEP:EVENT:RANK": once the save of checkpoint SAVE_STEP starts, the process SIGKILLs itself
  at its EVENT-th file-system change (a file opened for writing, a folder made, a rename, a removal), seen through
  Python's audit hooks, so every point of a save can be hit without knowing the code.
- TETRA_FAULT_COUNT=PATH (with TETRA_FAULT_KILL's SAVE_STEP and RANK, EVENT 0): count those changes and write the
  number to PATH at exit instead of killing.
- TETRA_FAULT_KILL_STEP="STEP:RANK": SIGKILL that rank when step STEP (0-based) starts, only in the first launch
  (torchrun's TORCHELASTIC_RESTART_COUNT is 0), as a crashed node would.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CHANGES = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.unlink", "os.rmdir", "shutil.rmtree"}


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _is_change(event: str, args: tuple) -> bool:
    if event in CHANGES:
        return True
    if event != "open" or not args:
        return False
    mode, flags = (args[1], args[2]) if len(args) >= 3 else (None, 0)
    if isinstance(mode, str):
        return any(letter in mode for letter in "wax+")
    return bool((flags or 0) & WRITE_FLAGS)


def _arm_kill(spec: str, count_path: str | None) -> None:
    from tetra.train import checkpointer

    save_step, event, rank = (int(part) for part in spec.split(":"))
    if rank != _rank():
        return
    state = {"armed": False, "seen": 0}
    real_save, real_close = checkpointer.Checkpointer.save, checkpointer.Checkpointer.close

    def finish_watching(self) -> None:
        if state["armed"]:
            self.wait()  # an asynchronous save's background writes belong to it too
            state["armed"] = False

    def save(self, step, *args, **kwargs):
        finish_watching(self)
        self.wait()  # the previous save's writes are not this one's
        state["armed"] = step == save_step
        folder = real_save(self, step, *args, **kwargs)
        if not self.asynchronous:
            state["armed"] = False
        return folder

    def close(self) -> None:
        finish_watching(self)
        real_close(self)

    def hook(name: str, args: tuple) -> None:
        if state["armed"] and _is_change(name, args):
            state["seen"] += 1
            if not count_path and state["seen"] == event:
                os.kill(os.getpid(), signal.SIGKILL)

    checkpointer.Checkpointer.save, checkpointer.Checkpointer.close = save, close
    sys.addaudithook(hook)
    if count_path:
        atexit.register(lambda: Path(count_path).write_text(str(state["seen"])))


def _arm_nan(spec: str) -> None:
    from tetra.train import loop

    bad_step, rank = (int(part) for part in spec.split(":"))
    real_compute = loop.Loop.compute

    def compute(self, step):
        step_loss, grad_norm = real_compute(self, step)
        if step == bad_step and _rank() == rank:
            step_loss.loss = float("nan")
        return step_loss, grad_norm

    loop.Loop.compute = compute


def _arm_kill_step(spec: str) -> None:
    from tetra.train import loop

    kill_step, rank = (int(part) for part in spec.split(":"))
    if rank != _rank() or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    real_compute = loop.Loop.compute

    def compute(self, step):
        if step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_compute(self, step)

    loop.Loop.compute = compute


def main() -> int:
    if "TETRA_FAULT_KILL" in os.environ:
        _arm_kill(os.environ["TETRA_FAULT_KILL"], os.environ.get("TETRA_FAULT_COUNT"))
    if "TETRA_FAULT_NAN" in os.environ:
        _arm_nan(os.environ["TETRA_FAULT_NAN"])
    if "TETRA_FAULT_KILL_STEP" in os.environ:
        _arm_kill_step(os.environ["TETRA_FAULT_KILL_STEP"])
    from tetra.cli import main as tetra_main

    return tetra_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
