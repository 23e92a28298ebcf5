"""One writer per workdir: `<workdir>/.lock`, taken by `scripts/train.py` for the whole run.

Two training runs on one workdir would interleave their checkpoints and `metrics.jsonl`, and
each would resume from the other's steps. So the training entry point takes this lock right
after parsing its config, and a second run on a workdir that a live run holds stops at once
with a `WorkdirBusyError` (one line naming the holder: host, pid, start time; exit status 2).

* Local paths (and network file systems that support it): an OS lock (`fcntl.flock`) on the
  open `.lock` file, which the kernel releases when the holder dies, whatever kills it. The
  file also holds the holder's record (JSON: host, pid, start time) for the error message; a
  clean exit empties it, so a record found under a free lock was left by a run that died
  without releasing it, and the new run takes over with a warning naming that run.
* `gs://` and other object-store paths (through `etils.epath`) have no locks: best effort, a
  record with a heartbeat that the holder rewrites every `HEARTBEAT_S` seconds. A record whose
  heartbeat is older than `STALE_AFTER_S`, or whose holder is a dead process on this host, is
  stale and taken over with a warning; any other record refuses. Object stores have no
  compare-and-swap, so two runs started within the same second may both win; the lock catches
  the common mistake (a second run started on a live workdir), not that race. If the record
  cannot be written at all, the run goes on unlocked with a warning.
* Multi-host: only process 0 takes the lock, for the whole job; other processes never touch it
  (`hold`), but they stop too when process 0 finds the workdir busy.

Readers (`scripts/evaluate.py`, `scripts/export_hf.py`, `recllm_jax.load_checkpoint`) never
take the lock: they read only committed checkpoint steps (see `build._checkpoint_step`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from recllm_jax import paths
from recllm_jax.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
HEARTBEAT_S = 60.0  # object stores: how often the holder rewrites its record
STALE_AFTER_S = 300.0  # object stores: a record not rewritten for this long is a dead run's


class WorkdirBusyError(UserError, RuntimeError):
  """Another live training run holds the workdir."""


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _read_record(text: str) -> dict[str, Any] | None:
  """The holder record in `text`; None for an empty file; {} for one that is not a record."""
  if not text.strip():
    return None
  try:
    record = json.loads(text)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def describe(record: dict[str, Any] | None) -> str:
  """'host h, pid 12, started 2025-01-01T10:00:00+00:00' (what is known of a holder)."""
  if record is None:
    return "holder still writing its record"
  if not record:
    return "holder unknown: an unreadable lock file"
  return (f"host {record.get('host', '?')}, pid {record.get('pid', '?')}, "
          f"started {record.get('started', '?')}")


def _pid_alive(pid: Any) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, TypeError, OverflowError):
    return True  # someone else's process, or no pid to check: assume alive
  return True


class WorkdirLock:
  """The lock of one workdir; `acquire` / `release`, or use it as a context manager."""

  def __init__(self, workdir: str | os.PathLike, *, os_lock: bool | None = None):
    """`os_lock`: use `fcntl.flock` (default: for local paths); False: the heartbeat record
    of object stores (tests use it on a local directory)."""
    self.workdir = paths.workdir_path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.os_lock = (not paths.is_uri(self.workdir)) if os_lock is None else os_lock
    self.record: dict[str, Any] | None = None
    self._fd: int | None = None
    self._stop = threading.Event()
    self._heartbeat: threading.Thread | None = None

  def _busy(self, record: dict[str, Any] | None) -> WorkdirBusyError:
    return WorkdirBusyError(
        f"workdir {self.workdir} is in use by another training run ({describe(record)}); one "
        f"writer per workdir: wait for that run to end or stop it, or set another "
        f"--config.workdir (lock file {self.path})")

  def _new_record(self) -> dict[str, Any]:
    now = _now()
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
            "heartbeat_unix": time.time()}

  def acquire(self) -> WorkdirLock:
    """Takes the lock, or raises WorkdirBusyError naming the live holder."""
    self.workdir.mkdir(parents=True, exist_ok=True)
    if self.os_lock:
      self._acquire_os()
    else:
      self._acquire_record()
    return self

  def _acquire_os(self) -> None:
    import fcntl

    fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise self._busy(_read_record(self.path.read_text())) from None
    previous = _read_record(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
    if previous is not None:
      log.warning("taking over the lock of %s: its holder (%s) is gone without releasing it",
                  self.workdir, describe(previous))
    self.record = self._new_record()
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(self.record) + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd

  def _stale_reason(self, record: dict[str, Any]) -> str | None:
    """Why a record on an object store is a dead run's, or None if its holder may be alive."""
    if record.get("host") == socket.gethostname() and not _pid_alive(record.get("pid")):
      return "its process is gone"
    beat = record.get("heartbeat_unix")
    if not isinstance(beat, (int, float)):
      return "the record is unreadable"
    age = time.time() - beat
    if age > STALE_AFTER_S:
      return f"no heartbeat for {age:.0f} s (> {STALE_AFTER_S:.0f} s)"
    return None

  def _acquire_record(self) -> None:
    try:
      previous = _read_record(self.path.read_text()) if self.path.exists() else None
    except OSError as e:
      log.warning("cannot read the lock file %s (%s); going on without a workdir lock",
                  self.path, e)
      return
    if previous is not None:
      reason = self._stale_reason(previous)
      if reason is None:
        raise self._busy(previous)
      log.warning("taking over the lock of %s from %s: %s", self.workdir, describe(previous),
                  reason)
    self.record = self._new_record()
    if not self._write_record():
      self.record = None
      return
    self._stop.clear()
    self._heartbeat = threading.Thread(target=self._beat, name="workdir-lock-heartbeat",
                                       daemon=True)
    self._heartbeat.start()

  def _write_record(self) -> bool:
    try:
      self.path.write_text(json.dumps(self.record) + "\n")
      return True
    except OSError as e:
      log.warning("cannot write the lock file %s (%s); going on without a workdir lock",
                  self.path, e)
      return False

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      self.record = {**self.record, "heartbeat": _now(), "heartbeat_unix": time.time()}
      self._write_record()

  def release(self) -> None:
    """Gives the lock back (an empty lock file stays: the sign of a clean exit)."""
    if self._fd is not None:
      import fcntl

      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    elif self.record is not None:
      self._stop.set()
      if self._heartbeat is not None:
        self._heartbeat.join()
      try:  # only our own record: a run that took over a stale lock keeps its own
        if _read_record(self.path.read_text()) == self.record:
          self.path.unlink()
      except OSError as e:
        log.warning("cannot remove the lock file %s: %s", self.path, e)
    self.record = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, process_index: int,
         agree: Callable[[bool], bool] | None = None) -> Iterator[WorkdirLock | None]:
  """The lock of `workdir` for a job, held by process 0 only; other processes never touch it.

  `agree`: the OR of a flag over all processes (`distributed.any_process`, a collective every
  process calls), so that when process 0 finds the workdir busy every process stops with a
  WorkdirBusyError, instead of the others waiting for process 0 in their first collective.
  """
  lock = WorkdirLock(workdir) if process_index == 0 else None
  busy = None
  if lock is not None:
    try:
      lock.acquire()
    except WorkdirBusyError as e:
      busy = e
  if agree is not None and agree(busy is not None) and busy is None:
    busy = WorkdirBusyError(f"workdir {workdir} is in use by another training run (process 0's "
                            "error names it); one writer per workdir")
  if busy is not None:
    raise busy
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()


__all__ = ["HEARTBEAT_S", "LOCK_FILE", "STALE_AFTER_S", "WorkdirBusyError", "WorkdirLock",
           "describe", "hold"]
