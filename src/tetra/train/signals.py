"""Graceful stops: SIGTERM (cluster preemption) or Ctrl-C asks the loop to checkpoint and exit at the next step.

Entry point: StopRequest, a context manager whose `requested` flag the loop polls.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class StopRequest:
    """Installs SIGTERM/SIGINT handlers for the duration of a run; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
