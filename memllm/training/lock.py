"""One run per output folder: an OS-level lock held for the whole run.

``output_dir/memllm.lock`` is locked with ``flock`` by the run's main process and holds who
holds it (pid, host, command, start time). The operating system releases the lock when that
process ends, however it ends (a crash, SIGKILL), so a stale file never blocks a later run; a
second run on the same folder is refused in one line that names the first.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from memllm.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

LOCK_FILE = "memllm.lock"
# Locks this process holds, by folder: a new run in the same process takes over the lock of an
# earlier one that failed while being set up (its object may live on in a traceback).
_HELD: dict[Path, OutputLock] = {}


def _holder_text(path: Path) -> str:
    """What the lock file says of the process that holds it, in words."""
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


class OutputLock:
    """An exclusive lock on ``folder`` (created if needed); :meth:`release` or process exit
    frees it."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> OutputLock:
        """Take the lock, or raise a one-line :class:`ConfigError` naming the holder."""
        if fcntl is None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        key = self.folder.resolve()
        if key in _HELD:
            _HELD[key].release()
        # "a+": never truncate before holding the lock (the holder's details would be lost)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the run
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise ConfigError(
                f"output_dir: {self.folder} is in use by another run ({_holder_text(self.path)}); "
                "wait for it to finish or choose another output_dir"
            ) from None
        details = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps(details) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
        self._file = handle
        _HELD[key] = self
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None
            if _HELD.get(self.folder.resolve()) is self:
                del _HELD[self.folder.resolve()]

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def waiting_lock(path: str | os.PathLike):
    """Hold an exclusive lock on the file ``path`` for a short read-modify-write, waiting for
    any other holder (processes that share a report take turns writing it)."""
    if fcntl is None:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
