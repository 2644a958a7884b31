"""Progress for long runs: a live bar on a terminal, plain timestamped lines in logs and CI."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressDisplay:
    """Shows step, loss, lr, images/s and ETA; silent on ranks other than 0."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, every_s: float = 10.0):
        self.total = total
        self.step = initial
        self.start_step = initial
        self.desc = desc
        self.enabled = enabled
        self.every_s = every_s
        self.started = time.perf_counter()
        self.last_line = 0.0
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step")

    def advance(self, steps: int = 1) -> None:
        self.step += steps
        if self.bar is not None:
            self.bar.update(steps)

    def report(self, loss: float, lr: float, images_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}")
            return
        now = time.perf_counter()
        if now - self.last_line < self.every_s and self.step < self.total:
            return
        self.last_line = now
        elapsed = now - self.started
        done = self.step - self.start_step
        eta = elapsed / done * (self.total - self.step) if done else 0.0
        print(
            f"{self.desc} step {self.step}/{self.total} ({100 * self.step / self.total:.0f}%) "
            f"| loss {loss:.4f} | lr {lr:.2e} | {images_per_s:.0f} img/s "
            f"| elapsed {_clock(elapsed)} | ETA {_clock(eta)}",
            flush=True,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_every_s() -> float:
    """Seconds between plain progress lines (``ROPIM_PROGRESS_EVERY_S``, 10 by default)."""
    return float(os.environ.get("ROPIM_PROGRESS_EVERY_S", "10"))


PLURALS = {"batch": "batches"}  # the units used here whose plural is not unit + "s"


def tracked(
    items: Iterable[T],
    total: int,
    desc: str,
    unit: str = "batch",
    note: Callable[[], str] | None = None,
) -> Iterator[T]:
    """``items`` with progress for work that can take minutes at paper scale (feature
    extraction, k-NN, probe epochs, dense evaluation, data checks): a bar on a terminal,
    otherwise a line every :func:`progress_every_s` seconds and one at the end, with count,
    rate and ETA; ``note`` adds a live value (a loss). Silent on ranks other than 0."""
    from ropim.harness.runtime import launch_rank

    if launch_rank() != 0:
        yield from items
        return
    if sys.stderr.isatty():
        bar = tqdm(items, total=total, desc=desc, unit=unit)
        for item in bar:
            yield item
            if note is not None:
                bar.set_postfix_str(note())
        return
    every = progress_every_s()
    started = last = time.perf_counter()
    done = lines = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        # the closing line only after a long job (the k-NN monitor would repeat it every time)
        final = done == total and (lines or now - started >= every)
        if now - last >= every or final:
            lines += 1
            last = now
            elapsed = now - started
            eta = elapsed / done * max(total - done, 0)
            extra = f" | {note()}" if note is not None else ""
            units = PLURALS.get(unit, unit + "s")  # not "epoches"
            print(
                f"{desc}: {done}/{total} {units} ({100 * done / max(total, 1):.0f}%){extra} "
                f"| {done / max(elapsed, 1e-9):.1f} {units}/s | elapsed {_clock(elapsed)} "
                f"| ETA {_clock(eta)}",
                flush=True,
            )
