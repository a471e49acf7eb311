"""Fair sharing of one device between engines (one per served model): FIFO turns, one step per turn.

Each engine thread takes a turn around every step (schedule + model calls + output processing).
Turns are granted in arrival order, so with N busy engines they alternate and each gets one step in
N. A step is sized by its engine's scheduler to fit `--step-target-ms`, so N busy engines share the
device about equally in time, and an idle engine takes no turns (the device is not left idle for it).
A plain lock would not do: a thread that releases and at once re-acquires a lock usually wins it
again, starving the other engines.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class DeviceTurns:
    """A FIFO ticket lock: `with turns.turn(): ...` runs when every earlier taker has finished its turn."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self.turns_taken = 0

    @contextmanager
    def turn(self) -> Iterator[None]:
        with self._cv:
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._serving != ticket:
                self._cv.wait()
        try:
            yield
        finally:
            with self._cv:
                self._serving += 1
                self.turns_taken += 1
                self._cv.notify_all()
