"""Leases: one holder at a time for an experiment directory or for a run, however many processes,
executors or hosts try.

A lease is a small JSON file naming its holder: host, boot, pid and that pid's start time, the
command, since when, and when it last renewed. Every change to the file (take, renew, release)
is made under an exclusive ``flock`` on the file itself, which is never replaced or deleted, so
two processes can never both find it free. The holder renews it from a background thread.

Whether a holder is still there:

- on this host (same host name and boot): its pid exists, is not a zombie, and started when the
  lease says (a reused pid is somebody else). A live process is never overtaken, however late
  its renewal: it may still be writing.
- on another host: it renewed within ``ttl_s``. Hosts' clocks must agree to well within that.

A holder that is not there any more is taken over: a killed driver's lock does not need cleaning
up by hand. Two kinds of lease are used: the experiment directory's (``DIR/lmlab.lock``, held by
the driver: ``lmlab run``, ``preflight``, ``train``, ``doctor --recover``) and each run's
(``DIR/runs/<run_id>/lease.json``, held by the worker training it). Any executor's worker takes
its run's lease the same way, so a run never has two workers.

A worker also stops when its driver dies: on Linux the kernel signals it (``PR_SET_PDEATHSIG``),
and everywhere :func:`watch_driver` notices that the directory lock no longer names the driver
that started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from lmlab.errors import UserError
from lmlab.names import LOCK_FILE

TTL_S = 60.0  # a holder on another host that has not renewed for this long is gone
RENEW_EVERY_S = 5.0
WATCH_EVERY_S = 1.0  # how often a worker looks at its driver
ORPHAN_GRACE_S = 5.0  # a worker whose driver died stops at its next step; at the latest after this
# A worker finding its run's lease held waits this long for the holder (an orphan of a killed
# driver notices within WATCH_EVERY_S and is gone ORPHAN_GRACE_S later), twice over.
RUN_LEASE_WAIT_S = 2 * (WATCH_EVERY_S + ORPHAN_GRACE_S)
EXIT_BUSY = 75  # a worker that found its run's lease held by a live worker (EX_TEMPFAIL)
EXIT_ORPHANED = 76  # a worker that stopped because its driver died


def _this_boot() -> float:
    return round(psutil.boot_time())


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as written in its file."""

    host: str
    boot: float  # the host's boot time: after a reboot every old pid is gone
    pidns: str | None  # the pid namespace (Linux): a pid means something only inside it
    pid: int
    started: float  # the pid's start time: a reused pid is another process
    command: str
    token: str  # unique to one taking of the lease
    since: float
    renewed: float
    ttl_s: float

    def here(self) -> bool:
        """Whether the holder's pid means a process this one can see: same host, same boot,
        same pid namespace (two containers may share a host name and a volume)."""
        return (self.host == socket.gethostname() and abs(self.boot - _this_boot()) < 2
                and self.pidns == _pid_namespace())

    def alive(self, now: float | None = None) -> bool:
        if self.here():
            return pid_alive(self.pid, self.started)
        return (now or time.time()) - self.renewed <= self.ttl_s

    def describe(self, now: float | None = None) -> str:
        now = now or time.time()
        since = datetime.fromtimestamp(self.since, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return (f"pid {self.pid} on host {self.host} ({self.command}), since {since}, "
                f"renewed {max(0.0, now - self.renewed):.0f} s ago")


def pid_alive(pid: int, started: float | None = None) -> bool:
    """Whether ``pid`` is a running process of this host (not a zombie), and the one that
    started at ``started`` when given."""
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 0.5
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process: it exists
        return True


def _command() -> str:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    return " ".join(argv)[:300]


class LeaseHeld(UserError):
    """The lease is held by a live holder."""

    def __init__(self, message: str, holder: Holder, **where: Any) -> None:
        super().__init__(message, **where)
        self.holder = holder


class Lease:
    """One lease file, taken by this process.

    ``acquire()`` takes it (a dead holder's too), ``keep_renewed()`` starts the heartbeat,
    ``release()`` stops it and gives the lease back. ``lost`` is set if the lease
    was found in someone else's name at a renewal (only a holder judged dead is ever overtaken:
    a host that stopped renewing for longer than the TTL).
    """

    def __init__(self, path: Path | str, *, command: str | None = None,
                 ttl_s: float = TTL_S) -> None:
        self.path = Path(path)
        self.command = command or _command()
        self.ttl_s = ttl_s
        self.token = secrets.token_hex(8)
        self.lost = threading.Event()
        self._since = 0.0
        self._mutex = threading.RLock()  # the owner and its heartbeat thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the file, always under its flock ---------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _me(self) -> Holder:
        proc = psutil.Process()
        now = time.time()
        return Holder(host=socket.gethostname(), boot=_this_boot(), pidns=_pid_namespace(),
                      pid=os.getpid(),
                      started=proc.create_time(), command=self.command, token=self.token,
                      since=self._since or now, renewed=now, ttl_s=self.ttl_s)

    # -- taking, renewing, giving back ------------------------------------------------------------

    def acquire(self, *, wait_s: float = 0.0, poll_s: float = 0.25) -> Holder | None:
        """Take the lease. Returns the dead holder it was taken over from (None if it was free);
        raises :class:`LeaseHeld` when a live holder still has it after ``wait_s`` seconds."""
        deadline = time.monotonic() + wait_s
        while True:
            with self._mutex, self._locked() as fd:
                current = _read(fd)
                if current is None or current.token == self.token or not current.alive():
                    self._since = time.time()
                    _write(fd, self._me())
                    self.lost.clear()
                    return None if current is None or current.token == self.token else current
            if time.monotonic() >= deadline:
                raise LeaseHeld(f"{self.path} is held by {current.describe()}", current)
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    def renew(self) -> bool:
        """Refresh the renewal time; False (and ``lost`` set) when the lease is not ours any more."""
        with self._mutex, self._locked() as fd:
            current = _read(fd)
            if current is None or current.token != self.token:
                self.lost.set()
                return False
            _write(fd, replace(current, renewed=time.time()))
            return True

    def stop_renewing(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def release(self) -> None:
        """Stop renewing and clear the file if it still names us."""
        self.stop_renewing()
        with self._mutex, self._locked() as fd:
            current = _read(fd)
            if current is not None and current.token == self.token:
                os.ftruncate(fd, 0)
                os.fsync(fd)

    def keep_renewed(self, every_s: float = RENEW_EVERY_S) -> None:
        """Renew from a daemon thread until released (or lost)."""
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(every_s):
                try:
                    if not self.renew():
                        return
                except OSError:  # a transient file-system error: the next beat tries again
                    continue

        self._thread = threading.Thread(target=beat, name=f"lease {self.path.name}", daemon=True)
        self._thread.start()


def read_holder(path: Path) -> Holder | None:
    """Who holds the lease at ``path`` (alive or not); None when nobody does."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return _read(fd)
    finally:
        os.close(fd)


def _read(fd: int) -> Holder | None:
    data = os.pread(fd, 1 << 16, 0)
    if not data.strip():
        return None
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):  # a holder that died in the middle of writing it
        return None


def _write(fd: int, holder: Holder) -> None:
    data = json.dumps(asdict(holder), sort_keys=True).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


# ---- the experiment directory: one driver at a time -----------------------------------------

_HELD: dict[Path, list] = {}  # lock path -> [Lease, depth]: holds of this process, nested
_HELD_MUTEX = threading.Lock()


@contextlib.contextmanager
def hold_directory(directory: Path) -> Iterator[Lease]:
    """Hold ``directory``'s lock for the duration (creating the directory). Nested holds in one
    process share the lock, so every function that writes runs can say it needs the lock and a
    driver holding it already passes straight through. A UserError names the live holder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = (directory / LOCK_FILE).resolve()
    with _HELD_MUTEX:
        entry = _HELD.get(key)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield entry[0]
        finally:
            with _HELD_MUTEX:
                entry[1] -= 1
        return
    lease = Lease(key)
    try:
        stale = lease.acquire()
    except LeaseHeld as e:
        raise LeaseHeld(
            f"in use by another lmlab: {e.holder.describe()}. Wait for it to finish, or stop it "
            f"(kill {e.holder.pid} on {e.holder.host}); a lock whose holder has died is taken "
            "over by the next run", e.holder, file=str(directory)) from None
    if stale is not None:
        print(f"note: {directory}: the lmlab that held it is gone ({stale.describe()}); "
              "taking over", file=sys.stderr)
    lease.keep_renewed()
    with _HELD_MUTEX:
        _HELD[key] = [lease, 1]
    try:
        yield lease
    finally:
        with _HELD_MUTEX:
            del _HELD[key]
        with contextlib.suppress(OSError):  # a lock left behind is taken over as a dead one's
            lease.release()


def move_held_directory(src: Path, dst: Path) -> None:
    """Rename ``src``, whose lock this process holds, to ``dst`` and go on holding ``src`` as a
    new, empty directory: how an old experiment is moved aside without letting anyone in."""
    key = (Path(src) / LOCK_FILE).resolve()
    lease = _HELD[key][0]
    lease.stop_renewing()  # no renewal in between: the file moves under it
    Path(src).rename(dst)
    lease.path = Path(dst) / LOCK_FILE
    lease.release()  # the moved directory is nobody's
    Path(src).mkdir(exist_ok=True)
    lease.path = key
    try:
        lease.acquire()
    except LeaseHeld as e:
        raise UserError(f"another lmlab took the directory while the old results were being "
                        f"moved to {dst} (they are there): {e.holder.describe()}",
                        file=str(src)) from None
    lease.keep_renewed()


# ---- workers: stop when the driver is gone ---------------------------------------------------

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``; elsewhere nothing, and :func:`watch_driver` covers it). Returns
    False when the parent is already gone: then the signal would never come."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return os.getppid() == parent_pid


def watch_driver(on_gone: Callable[[str], None], *, lock: Path | None = None,
                 token: str | None = None, parent_pid: int | None = None,
                 every_s: float = WATCH_EVERY_S) -> threading.Thread:
    """Call ``on_gone(why)`` once, from a daemon thread, when the driver that started this
    process is gone: the directory lock ``lock`` no longer names its ``token`` (released, or
    taken over by a new driver) or its holder died, or (with ``parent_pid``) this process lost
    its parent. The lock part works for any executor that can read the experiment directory."""

    def watch() -> None:
        while True:
            time.sleep(every_s)
            if parent_pid is not None and os.getppid() != parent_pid:
                return on_gone(f"its parent, the driver (pid {parent_pid}), died")
            if lock is None or token is None:
                continue
            holder = read_holder(lock)
            if holder is None or holder.token != token:
                return on_gone(f"{lock} no longer names its driver")
            if not holder.alive():
                return on_gone(f"its driver is gone ({holder.describe()})")

    thread = threading.Thread(target=watch, name="driver watch", daemon=True)
    thread.start()
    return thread


def exit_after(seconds: float, code: int = EXIT_ORPHANED) -> None:
    """Leave the process ``seconds`` from now whatever it is doing: an orphaned worker stops at
    its next step boundary if it can, and this is the deadline. Safe for the records: the store
    commits whole transactions and a checkpoint is renamed into place only once complete."""
    timer = threading.Timer(seconds, os._exit, (code,))
    timer.daemon = True
    timer.start()
