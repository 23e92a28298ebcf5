"""recllm_jax.errors.UserErrors: several independent user errors reported together."""

from __future__ import annotations

import pytest

from recllm_jax.errors import ConfigError, MissingPathError, UserErrors


def test_attempt_keeps_user_errors_once_and_lets_bugs_through():
  found = UserErrors()
  assert found.attempt(lambda: 3) == 3
  def fails(error: Exception):
    raise error

  assert found.attempt(fails, ConfigError("a.b=1 is bad")) is None
  found.add(ConfigError("a.b=1 is bad"))  # a shared sub-check: kept once
  found.attempt(fails, UserErrors([MissingPathError("x missing"), ConfigError("a.b=1 is bad")]))
  assert [str(e) for e in found.errors] == ["a.b=1 is bad", "x missing"]
  assert str(found) == "a.b=1 is bad\nx missing"
  with pytest.raises(ZeroDivisionError):  # a bug is not a user error
    found.attempt(lambda: 1 / 0)
  with pytest.raises(UserErrors) as info:
    found.raise_found()
  assert info.value is found


def test_raise_found_raises_a_single_error_as_itself_and_nothing_when_clean():
  UserErrors().raise_found()
  found = UserErrors()
  found.add(MissingPathError("x missing"))
  with pytest.raises(MissingPathError, match="x missing"):
    found.raise_found()
