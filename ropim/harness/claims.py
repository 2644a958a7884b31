"""Shared work: any number of processes on one comparison folder split its work units.

Each unit (a pre-training run, one task's evaluation of one run, the report) is claimed by
creating ``<claims>/<key>.claim`` with ``O_CREAT | O_EXCL`` on the shared file system (atomic on
local disks and on NFSv3+). The claim names its launch (all ranks of one torchrun or srun step
share it, so they join one claim), host and PID; a thread touches it every
:data:`heartbeat_s` seconds. A claim is stale, and is taken over, when its heartbeat is older
than ``ROPIM_CLAIM_STALE_S`` (600 s by default) or when its process on this host is gone. A
process that meets a unit claimed by a live process does the other units first, then waits for
it (polling every ``ROPIM_CLAIM_POLL_S``, 30 s) and takes it over if its claimant dies.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ropim.harness.errors import CheckpointError
from ropim.harness.runtime import launch_id, launch_rank


class ClaimError(CheckpointError):
    """A claim could not be written (the shared folder's file system refused it)."""


def stale_after_s() -> float:
    return float(os.environ.get("ROPIM_CLAIM_STALE_S", "600"))


def poll_s() -> float:
    return float(os.environ.get("ROPIM_CLAIM_POLL_S", "30"))


def heartbeat_s() -> float:
    return max(min(30.0, stale_after_s() / 5), 0.05)


def unreadable_stale_s() -> float:
    """A claim without its holder's fields (a creator that died between creating and writing
    it, or a full disk) is stale this soon: a live creator writes them within milliseconds."""
    return min(heartbeat_s(), stale_after_s())


def _read(path: Path) -> tuple[bytes, dict[str, Any]] | None:
    """The claim's bytes and fields; None when there is no claim. A half-written or foreign
    file reads as an empty holder (judged by its age alone)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        fields = json.loads(data)
    except ValueError:
        fields = {}
    return data, fields if isinstance(fields, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    return f"{holder.get('host', '?')} pid {holder.get('pid', '?')} ({holder.get('launch', '?')})"


class Claim:
    """One unit's claim file; :meth:`acquire` says whether this launch holds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.launch = launch_id()
        self.holder: dict[str, Any] = {}  # who holds it, when acquire() answered False
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _create(self) -> bool:
        fields = {
            "launch": self.launch,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "claimed_at": datetime.now(timezone.utc).isoformat(),
        }
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(fields, handle)
        except OSError as exc:  # a full disk: no empty claim may stay behind to block others
            self.path.unlink(missing_ok=True)
            raise ClaimError(
                f"could not write the claim {self.path} ({exc.strerror or exc}); nothing was "
                f"started: free space on that file system, then run the same command again"
            ) from None
        return True

    def _stale(self, fields: dict[str, Any]) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if age > stale_after_s():
            return True
        if "launch" not in fields and age > unreadable_stale_s():
            return True
        same_host = fields.get("host") == socket.gethostname()
        pid = fields.get("pid")
        return same_host and isinstance(pid, int) and not _pid_alive(pid)

    def _take_over(self, seen: bytes) -> None:
        """Move the stale claim aside; if what was moved is not what was judged stale (another
        process renewed it meanwhile), put it back."""
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{time.time_ns()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        try:
            if aside.read_bytes() != seen:
                with contextlib.suppress(FileExistsError):
                    os.link(aside, self.path)
        finally:
            aside.unlink(missing_ok=True)

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return True
            current = _read(self.path)
            if current is None:
                continue  # released between the two calls: try again
            data, fields = current
            if fields.get("launch") == self.launch:  # another rank of this launch made it
                self._start_heartbeat()
                return True
            if not self._stale(fields):
                self.holder = fields
                return False
            print(f"claim {self.path.name}: taking over from {describe(fields)} (stale)")
            self._take_over(data)
        current = _read(self.path)
        self.holder = current[1] if current else {}
        return False

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, daemon=True, name="claim-heartbeat")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_s()):
            current = _read(self.path)
            if current is None or current[1].get("launch") != self.launch:
                if not self.lost:
                    self.lost = True
                    who = describe(current[1]) if current else "nobody"
                    print(
                        f"warning: claim {self.path} was taken over (now held by {who}) while "
                        f"this process still works on it: this process's heartbeats stopped for "
                        f"longer than ROPIM_CLAIM_STALE_S={stale_after_s():.0f}s"
                    )
                continue
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat; rank 0 removes the claim if it is still this launch's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if launch_rank() != 0:
            return
        current = _read(self.path)
        if current is not None and current[1].get("launch") == self.launch:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def held(claim: Claim) -> Iterator[Claim]:
    try:
        yield claim
    finally:
        claim.release()


@dataclass
class WorkUnit:
    """One piece of shared work: ``key`` names its claim, ``done`` reads its finished mark
    (written before the claim is released), ``run`` does it."""

    key: str
    label: str
    done: Callable[[], bool]
    run: Callable[[], Any]


def share_work(
    units: Sequence[WorkUnit], claims_dir: Path, say: Callable[[str], None] = print
) -> None:
    """Do every unit not done yet and not claimed by a live process; then wait for the units
    others hold, taking over any whose claimant dies. Returns when every unit is done."""
    pending = list(units)
    first_pass = True
    waiting_for: set[str] = set()
    while pending:
        still = []
        for unit in pending:
            if unit.done():
                if first_pass:
                    say(f"{unit.label}: done earlier, skipped")
                elif unit.key in waiting_for:
                    say(f"{unit.label}: done by another process")
                continue
            claim = Claim(claims_dir / f"{unit.key}.claim")
            if not claim.acquire():
                if unit.key not in waiting_for:
                    holder = describe(claim.holder)
                    say(f"{unit.label}: claimed by {holder}; doing other work first")
                    waiting_for.add(unit.key)
                still.append(unit)
                continue
            with held(claim):
                if unit.done():  # finished by another process between the check and the claim
                    say(f"{unit.label}: done by another process")
                    continue
                say(unit.label)
                unit.run()
        pending = still
        first_pass = False
        if pending:
            time.sleep(poll_s())
