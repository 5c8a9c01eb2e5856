"""One run per workdir: ``WORKDIR/lasa.lock``.

Two runs on one workdir interleave ``metrics.jsonl`` rows, export whichever model finishes last
and race on Orbax's temporary directories; so a run takes the workdir first and a second run
stops at once with one line naming the holder.

* Taken atomically: the file is created with ``O_CREAT | O_EXCL`` and holds the holder's host,
  pid, process start time, start date and command line (JSON).
* Released on exit: ``release()`` (the runner calls it in ``finally``) removes it.
* Stale locks are detected: on the same host, a holder whose process is gone (or whose pid now
  belongs to a younger process) is stale; on another host, where no process can be inspected, a
  lock whose heartbeat (its mtime, touched every ``HEARTBEAT_S`` by the holder) is older than
  ``STALE_AFTER_S`` is stale. A stale lock is replaced, and the replacement is logged. Breaking it
  goes through a second ``O_EXCL`` file, so two runs that find the same stale lock cannot both
  take the workdir.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time

from lasa_jax.errors import WorkdirError, WorkdirLocked

log = logging.getLogger("lasa_jax")

LOCK_NAME = "lasa.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 15 * 60.0
_BREAK_STALE_S = 60.0  # a break file older than this was left by a process that died mid-break


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown; with the
    pid it identifies a process, so a recycled pid is not mistaken for the holder."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in (...) may hold spaces
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    now = _process_start(pid)
    return start is None or now is None or now == start


def _read(path: str) -> dict | None:
    """The holder record, None if the file vanished; a torn or foreign file reads as {}."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except json.JSONDecodeError:
        return {}


def describe(info: dict) -> str:
    return (f"host {info.get('host', '?')} pid {info.get('pid', '?')} since {info.get('started', '?')} "
            f"({' '.join(info.get('argv', []))[:160]})")


class WorkdirLock:
    """``with WorkdirLock(workdir): ...`` or ``acquire()`` / ``release()``."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self.held = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ acquire
    def acquire(self) -> None:
        try:
            os.makedirs(self.workdir, exist_ok=True)
        except OSError as e:
            raise WorkdirError(f"{self.workdir}: cannot create the workdir ({e.strerror})") from None
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self._break_if_stale()
                continue
            except OSError as e:
                raise WorkdirError(f"{self.path}: cannot create the workdir lock ({e.strerror})") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            self._thread = threading.Thread(target=self._heartbeat, name="lasa-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        info = _read(self.path) or {}
        raise WorkdirLocked(f"{self.path}: the workdir is in use by {describe(info)}")

    def _stale_reason(self, info: dict) -> str | None:
        """Why the lock in ``info`` is stale, None while its holder may be running."""
        if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
            if _alive(info["pid"], info.get("start")):
                return None
            return f"process {info['pid']} on this host is gone"
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return "released"
        if age > STALE_AFTER_S:
            return f"no heartbeat for {age / 60:.0f} min"
        return None

    def _break_if_stale(self) -> None:
        info = _read(self.path)
        if info is None:
            return  # released meanwhile: try again
        reason = self._stale_reason(info)
        if reason is None:
            raise WorkdirLocked(f"{self.path}: the workdir is in use by {describe(info)}; wait for it, use "
                                "another workdir, or remove this file if that run is gone")
        breaker = self.path + ".break"
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                if time.time() - os.stat(breaker).st_mtime > _BREAK_STALE_S:
                    os.remove(breaker)
            except FileNotFoundError:
                pass
            time.sleep(0.2)
            return  # another run is breaking it: try again
        os.close(fd)
        try:
            # Still the same stale lock? (Another run may have broken and re-taken it meanwhile.)
            if _read(self.path) == info:
                os.remove(self.path)
                log.warning("%s: replaced a stale lock (%s): %s", self.path, reason, describe(info))
        finally:
            os.remove(breaker)

    # ------------------------------------------------------------------ hold / release
    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a full or vanished file system: the run itself will report it

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.held = False
        info = _read(self.path)
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            try:
                os.remove(self.path)
            except OSError as e:
                log.warning("%s: could not remove the workdir lock (%s)", self.path, e.strerror)
