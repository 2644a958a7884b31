"""Pre-emption: SIGTERM (what SLURM and most schedulers send before a kill) and SIGUSR1
(SLURM's ``--signal=USR1@<seconds>``) ask every loop to write a checkpoint at the next step
boundary and stop; the command then exits with status 128 + the signal's number (143 for
SIGTERM, 138 for SIGUSR1), and ``--resume`` (or the same ``ropim reproduce``) continues
bit-identically. Ctrl-C keeps its own meaning (stop now; the newest checkpoint stays)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(RuntimeError):
    """A loop stopped at a step boundary on request, after writing its checkpoint."""

    def __init__(self, signum: int, step: int, where: str) -> None:
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at step {step}; checkpoint written to {where}: run the same "
            f"command again (pretrain with --resume) to continue from it"
        )
        self.signum, self.step = signum, step

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequests:
    """Records SIGTERM/SIGUSR1 instead of dying; :meth:`pending` says (all ranks agreeing)
    whether one arrived."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _record(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def pending(self, fabric: Any) -> int | None:
        """The signal any rank received, or None; every rank gets the same answer, so they
        stop at the same step."""
        local = float(self.signum or 0)
        if fabric.world_size > 1:
            import torch

            local = float(fabric.all_reduce(torch.tensor(local), reduce_op="max"))
        return int(local) or None


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequests]:
    """Catch the pre-emption signals for the duration of a loop (main thread only; elsewhere
    they keep their default action)."""
    requests = StopRequests()
    previous = {}
    try:
        for signum in SIGNALS:
            previous[signum] = signal.signal(signum, requests._record)
    except ValueError:  # not the main thread: leave the signals alone
        previous = {}
    try:
        yield requests
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
