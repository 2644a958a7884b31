"""Where a training run stands: what a method reads while computing its loss (ramps over the
run) and receives after every optimiser step (EMA teachers, counters)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunProgress:
    """``step`` counts optimiser steps completed: 0 while the first step's loss is computed,
    1 in the hook after it; the last step's hook sees ``step == total_steps``. Derived from the
    step alone, so a resumed run sees exactly what the uninterrupted one saw."""

    step: int
    total_steps: int
    steps_per_epoch: int

    @property
    def epoch(self) -> float:
        """Epochs completed (fractional)."""
        return self.step / max(self.steps_per_epoch, 1)

    @property
    def fraction(self) -> float:
        """Share of the run's steps completed, 0 at the start, 1 after the last step."""
        return min(1.0, self.step / max(self.total_steps, 1))
