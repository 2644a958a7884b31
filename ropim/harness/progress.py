"""Progress for long runs: a live bar on a terminal, plain timestamped lines in logs and CI."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


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
