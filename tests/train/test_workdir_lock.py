"""One writer per workdir (recllm_jax/train/workdir_lock.py): a live holder refuses a second run
with one line naming it, a dead holder's lock is taken over with a warning, processes other than
0 never touch the lock, scripts/train.py exits 2 at once on a held workdir, and readers only see
committed checkpoint steps."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recllm_jax.train import workdir_lock
from recllm_jax.train.workdir_lock import LOCK_FILE, WorkdirBusyError, WorkdirLock

REPO = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time
from recllm_jax.train.workdir_lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _record(workdir: Path) -> dict | None:
  text = (workdir / LOCK_FILE).read_text()
  return json.loads(text) if text.strip() else None


def test_a_live_holder_refuses_then_its_lock_is_taken_over_once_it_is_killed(tmp_path, caplog):
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirBusyError) as busy:
      WorkdirLock(tmp_path).acquire()
    message = str(busy.value)
    assert "\n" not in message
    assert f"pid {holder.pid}" in message and f"host {socket.gethostname()}" in message
    assert f"started {_record(tmp_path)['started']}" in message
  finally:
    holder.send_signal(signal.SIGKILL)  # dies holding the lock: the kernel releases it
    holder.wait()
  with caplog.at_level(logging.WARNING, logger=workdir_lock.__name__):
    lock = WorkdirLock(tmp_path).acquire()
  assert "taking over" in caplog.text and f"pid {holder.pid}" in caplog.text
  assert _record(tmp_path)["pid"] == os.getpid()
  lock.release()
  assert _record(tmp_path) is None  # a clean exit leaves an empty lock file


def test_a_stale_lock_file_is_taken_over_with_a_warning(tmp_path, caplog):
  dead = {"host": "gone-host", "pid": 999999, "started": "2020-01-01T00:00:00+00:00"}
  (tmp_path / LOCK_FILE).write_text(json.dumps(dead))  # a crashed run's record, no OS lock
  with caplog.at_level(logging.WARNING, logger=workdir_lock.__name__):
    with WorkdirLock(tmp_path) as lock:
      assert _record(tmp_path) == lock.record and lock.record["pid"] == os.getpid()
  assert "taking over" in caplog.text and workdir_lock.describe(dead) in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger=workdir_lock.__name__):
    with WorkdirLock(tmp_path):  # after a clean release: no warning
      pass
  assert "taking over" not in caplog.text


def test_only_process_zero_touches_the_lock(tmp_path):
  fresh = tmp_path / "fresh"
  with workdir_lock.hold(fresh, process_index=1):
    assert not fresh.exists()
  with WorkdirLock(tmp_path):  # held (another open file: flock conflicts within a process too)
    before = (tmp_path / LOCK_FILE).read_bytes()
    with workdir_lock.hold(tmp_path, process_index=3, agree=lambda busy: busy):
      pass
    assert (tmp_path / LOCK_FILE).read_bytes() == before
    # When process 0 finds the workdir busy, the others stop too (they learn it from `agree`).
    with pytest.raises(WorkdirBusyError, match="process 0"):
      with workdir_lock.hold(fresh, process_index=1, agree=lambda busy: True):
        pass
    assert not fresh.exists()
    with pytest.raises(WorkdirBusyError):
      with workdir_lock.hold(tmp_path, process_index=0):
        pass


def test_object_store_record_refuses_a_fresh_heartbeat_and_takes_over_a_stale_one(
    tmp_path, caplog, monkeypatch):
  """The best-effort protocol of gs:// workdirs, run on a local directory."""
  lock_file = tmp_path / LOCK_FILE
  now = time.time()
  other = {"host": "other-host", "pid": 1, "started": "then", "heartbeat_unix": now}
  lock_file.write_text(json.dumps(other))
  with pytest.raises(WorkdirBusyError, match="host other-host, pid 1, started then"):
    WorkdirLock(tmp_path, os_lock=False).acquire()
  for stale in ({**other, "heartbeat_unix": now - workdir_lock.STALE_AFTER_S - 1},
                {**other, "host": socket.gethostname(), "pid": 999999}):  # dead on this host
    lock_file.write_text(json.dumps(stale))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=workdir_lock.__name__):
      lock = WorkdirLock(tmp_path, os_lock=False).acquire()
    assert "taking over" in caplog.text, stale
    assert _record(tmp_path)["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()
  # The holder's heartbeat keeps its record fresh.
  monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.05)
  with WorkdirLock(tmp_path, os_lock=False):
    first = _record(tmp_path)["heartbeat_unix"]
    deadline = time.time() + 5
    while _record(tmp_path)["heartbeat_unix"] == first and time.time() < deadline:
      time.sleep(0.02)
    assert _record(tmp_path)["heartbeat_unix"] > first


def test_train_py_on_a_held_workdir_exits_2_with_one_line(tmp_path):
  with WorkdirLock(tmp_path / "w") as lock:
    holder = workdir_lock.describe(lock.record)  # host, pid, start time
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--config",
         str(REPO / "configs" / "sft.py") + ":tiny", f"--config.workdir={tmp_path / 'w'}",
         f"--config.data.dir={tmp_path / 'data'}"],
        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: WorkdirBusyError: ")
  assert holder in proc.stderr and f"pid {os.getpid()}" in holder, proc.stderr
  assert sorted(os.listdir(tmp_path / "w")) == [LOCK_FILE]  # nothing else written


def test_readers_see_committed_steps_only(tmp_path, monkeypatch):
  """evaluate.py / export_hf.py resolve steps here: never a step still being written."""
  from orbax.checkpoint._src.path import atomicity, atomicity_defaults

  from recllm_jax.errors import MissingPathError
  from recllm_jax.train.build import _checkpoint_step

  ckpts = tmp_path / "checkpoints"
  (ckpts / "6.orbax-checkpoint-tmp-1234").mkdir(parents=True)  # a local save in progress
  with pytest.raises(MissingPathError, match="no finished checkpoint"):
    _checkpoint_step(tmp_path, None)
  (ckpts / "4").mkdir()
  assert _checkpoint_step(tmp_path, None) == (ckpts, 4)
  # gs:// saves write the step in place and commit it with commit_success.txt: simulate that.
  monkeypatch.setattr(atomicity_defaults, "get_default_temporary_path_class",
                      lambda *a, **k: atomicity.CommitFileTemporaryPath)
  (ckpts / "4" / "commit_success.txt").write_text("ok")
  (ckpts / "8").mkdir()  # being written
  assert _checkpoint_step(tmp_path, None) == (ckpts, 4)
  (ckpts / "8" / "commit_success.txt").write_text("ok")
  assert _checkpoint_step(tmp_path, None) == (ckpts, 8)
