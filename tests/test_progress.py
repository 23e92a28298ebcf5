"""recllm_jax.progress: bars redraw rarely when their output is a log, not a terminal."""

from __future__ import annotations

import io
import sys

from recllm_jax import progress


class _Terminal(io.StringIO):
  def isatty(self) -> bool:
    return True


def test_a_bar_written_to_a_log_redraws_at_most_every_interval(monkeypatch):
  monkeypatch.setattr(sys, "stderr", io.StringIO())
  assert progress.bar(total=3, file=io.StringIO()).mininterval == progress.LOG_INTERVAL_S
  assert progress.bar(total=3, mininterval=2.0, file=io.StringIO()).mininterval == 2.0
  monkeypatch.setattr(sys, "stderr", _Terminal())
  assert progress.bar(total=3, file=io.StringIO()).mininterval == 0.1  # tqdm's own default


def test_a_logged_bar_writes_its_first_and_last_state_only(monkeypatch):
  log = io.StringIO()
  monkeypatch.setattr(sys, "stderr", log)
  for _ in progress.bar(range(500), desc="work", file=log):
    pass
  states = [s for s in log.getvalue().split("\r") if s.strip()]
  assert len(states) == 2 and "0/500" in states[0] and "500/500" in states[-1], states
