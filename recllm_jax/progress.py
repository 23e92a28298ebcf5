"""Progress bars that read well on a terminal and in a captured log alike.

On a terminal tqdm redraws one line in place, so it may redraw often. Written to a file or a
pipe (a CI log, `reproduce.sh > run.log`), every redraw is another line: there a bar updates at
most every `LOG_INTERVAL_S` seconds (its first and last state are always written).
"""

from __future__ import annotations

import sys
from typing import Any

LOG_INTERVAL_S = 30.0


def bar(iterable: Any = None, **kwargs: Any):
  """`tqdm.auto.tqdm(iterable, **kwargs)`, redrawing at most every `LOG_INTERVAL_S` seconds
  when stderr is not a terminal (unless `mininterval` is given)."""
  from tqdm.auto import tqdm

  if not sys.stderr.isatty():
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
  return tqdm(iterable, **kwargs)


__all__ = ["LOG_INTERVAL_S", "bar"]
