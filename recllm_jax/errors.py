"""Errors the user fixes (a config key, a path, a data file), as opposed to bugs.

Every such error derives from `UserError`, so a command-line entry point catches one type and
prints the message on one line (exit status 2) instead of a traceback, while a bug still shows
its traceback. Each subclass also derives from the built-in type callers already expect
(`ValueError`, `FileNotFoundError`, ...), so existing `except` clauses keep working.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

__all__ = ["ConfigError", "MissingPathError", "UserError", "UserErrors"]

T = TypeVar("T")


class UserError(Exception):
  """A problem in the user's config, files or data; the message says what to change."""


class ConfigError(UserError, ValueError):
  """A config value (run config key or HF `config.json` field) that cannot be used as given."""


class MissingPathError(UserError, FileNotFoundError):
  """A path named by a config key does not exist."""


class UserErrors(UserError):
  """Several independent user errors found in one pass, so that one run shows them all.

  `errors` holds them in the order found; `str()` has one per line. Collect them with
  `attempt` (a check that may raise) or `add` (an error found inline), end with `raise_found`:

      found = UserErrors()
      mesh = found.attempt(make_mesh, config)   # None when it failed
      found.attempt(check_paths, config)
      found.raise_found()                       # nothing found: returns
  """

  def __init__(self, errors: list[UserError] | None = None):
    self.errors: list[UserError] = list(errors or [])
    super().__init__()

  def __str__(self) -> str:
    return "\n".join(str(e) for e in self.errors)

  def attempt(self, check: Callable[..., T], *args, **kwargs) -> T | None:
    """`check(*args, **kwargs)`; a UserError it raises is kept (once) and None returned."""
    try:
      return check(*args, **kwargs)
    except UserErrors as e:
      for error in e.errors:
        self.add(error)
    except UserError as e:
      self.add(e)
    return None

  def add(self, error: UserError) -> None:
    """Keeps `error` (once: two checks may share a sub-check)."""
    if str(error) not in {str(e) for e in self.errors}:
      self.errors.append(error)

  def raise_found(self) -> None:
    """Raises the one error found as itself, several as this `UserErrors`; else returns."""
    if len(self.errors) == 1:
      raise self.errors[0]
    if self.errors:
      raise self
