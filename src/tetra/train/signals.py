"""Signals a running job answers between steps: SIGTERM (a cluster's preemption notice, or torchrun passing one
on) and Ctrl-C ask for a checkpoint and a clean exit; SIGUSR1 asks for a checkpoint and training goes on.

Entry point: StopRequest, a context manager whose flags the loop polls (and agrees on over the ranks).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
CHECKPOINT_SIGNAL = signal.SIGUSR1


class StopRequest:
    """Installs the handlers for the duration of a run; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested: str | None = None  # the stop signal's name
        self.checkpoint_requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if number == CHECKPOINT_SIGNAL:
            self.checkpoint_requested = True
            return
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name

    def checkpoint_taken(self) -> None:
        self.checkpoint_requested = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for number in (*STOP_SIGNALS, CHECKPOINT_SIGNAL):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
