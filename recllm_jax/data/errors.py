"""Error type shared by every data reader.

Bad data is the most common failure when users bring their own files, so
every message pinpoints the offending location as ``path:line: ...`` (1-based
line numbers, like compilers and linters) and names the field or item id.
That lets a user jump straight to the broken row instead of bisecting a
multi-gigabyte file.
"""

from __future__ import annotations

import os

from recllm_jax.errors import UserError

__all__ = ["DataError"]


class DataError(UserError, ValueError):
  """A dataset file is malformed, inconsistent or empty.

  Subclasses :class:`ValueError` so callers that already guard against bad
  values keep working. ``path``/``line``/``field``/``item_id`` are kept as
  attributes so tooling (e.g. ``on_bad_data="skip"`` reports) can use them
  without parsing the message.
  """

  def __init__(
    self,
    message: str,
    *,
    path: str | os.PathLike[str] | None = None,
    line: int | None = None,
    field: str | None = None,
    item_id: str | None = None,
  ) -> None:
    self.path = None if path is None else str(path)
    self.line = line
    self.field = field
    self.item_id = item_id
    self.reason = message
    location = ""
    if self.path is not None:
      location = self.path if line is None else f"{self.path}:{line}"
      location += ": "
    super().__init__(location + message)
