"""What a person sees while training: a live bar (loss, tokens/s, ETA) on a terminal, plain lines otherwise.

Entry point: ProgressReporter(total_steps, start_step, enabled), used as a context manager.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class ProgressReporter:
    """Shows the newest loss and throughput; on a terminal a rich progress bar, else one line per logged step."""

    def __init__(self, total_steps: int, start_step: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=self.console,
                                 disable=not self.live)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, status="")
        self.tokens_per_s: float | None = None

    def __enter__(self) -> ProgressReporter:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.__exit__(*exc_info)

    def update(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.tokens_per_s = record.get("tokens_per_s", self.tokens_per_s)
        status = f"loss {record['loss']:.4f}" if "loss" in record else "step skipped (non-finite)"
        if self.tokens_per_s:
            status += f"  {self.tokens_per_s:,.0f} tok/s"
        if "val_loss" in record:
            status += f"  val {record['val_loss']:.4f}"
        self.progress.update(self.task, completed=step, status=status)
        if not self.live and ("tokens_per_s" in record or "val_loss" in record):
            extra = f"  mfu {record['mfu']:.1%}" if "mfu" in record else ""
            sys.stderr.write(f"step {step}/{self.progress.tasks[0].total}  {status}{extra}\n")
