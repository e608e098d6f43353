"""What a checkpoint really costs the training: not only the time the loop is blocked copying state
off the device, but also how much slower the steps run while the save uploads beside them (the
upload's CPU, memory bandwidth and network share)."""

from __future__ import annotations

import statistics
from collections import deque


class CheckpointCost:
    """The training time a save costs: the extra wall time of the steps it overlapped (from the step
    that started it, whose time includes the copy off the device, to the last step it was in flight
    during), against the median time of the recent steps that overlapped no save; plus time spent
    saving outside any step (`add`). The loop calls `observe` once per step and `finish` when the
    save's outcome arrives."""

    def __init__(self, window: int = 32) -> None:
        self._quiet: deque = deque(maxlen=window)  # times of recent steps without a save beside them
        self._extra = 0.0

    def observe(self, step_time: float, saving: bool) -> None:
        if not saving:
            self._quiet.append(step_time)
        elif self._quiet:  # before the first quiet step there is no baseline to compare with
            self._extra += step_time - statistics.median(self._quiet)

    def add(self, seconds: float) -> None:
        self._extra += seconds

    def finish(self) -> float:
        """The cost of the save that just finished (never negative: step times scatter), and reset."""
        cost, self._extra = max(0.0, self._extra), 0.0
        return cost
