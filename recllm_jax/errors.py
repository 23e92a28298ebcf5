"""Errors the user fixes (a config key, a path, a data file), as opposed to bugs.

Every such error derives from `UserError`, so a command-line entry point catches one type and
prints the message on one line (exit status 2) instead of a traceback, while a bug still shows
its traceback. Each subclass also derives from the built-in type callers already expect
(`ValueError`, `FileNotFoundError`, ...), so existing `except` clauses keep working.
"""

from __future__ import annotations

__all__ = ["ConfigError", "MissingPathError", "UserError"]


class UserError(Exception):
  """A problem in the user's config, files or data; the message says what to change."""


class ConfigError(UserError, ValueError):
  """A config value (run config key or HF `config.json` field) that cannot be used as given."""


class MissingPathError(UserError, FileNotFoundError):
  """A path named by a config key does not exist."""
