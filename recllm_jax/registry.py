"""Name -> function registries for everything a config selects by name (tunix style): advantage
estimators, loss aggregations, rewards. One class, so every lookup fails the same way: a
`ConfigError` naming the config key and listing the known names."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from recllm_jax.errors import ConfigError

__all__ = ["Registry"]

F = TypeVar("F", bound=Callable)


class Registry(dict[str, F], Generic[F]):
  """A dict filled by `@registry.register(name)`; `registry.lookup(name)` reads it.

  Args:
    what: what the entries are, for messages ("advantage estimator").
    key: the config key that selects one ("grpo.advantage"; "{name}" is filled in).
  """

  def __init__(self, what: str, key: str):
    super().__init__()
    self.what, self.key = what, key

  def register(self, name: str) -> Callable[[F], F]:
    """Decorator adding `fn` under `name`; registering another function there is an error."""

    def decorate(fn: F) -> F:
      if name in self and self[name] is not fn:
        raise ValueError(f"{self.what} {name!r} is already registered "
                         f"({self[name].__module__}.{self[name].__qualname__})")
      self[name] = fn
      return fn

    return decorate

  def lookup(self, name: str) -> F:
    """The entry `name`; ConfigError (naming the config key) lists the known ones."""
    if name not in self:
      raise ConfigError(f"unknown {self.what} {name!r} ({self.key.format(name=name)}); "
                        f"known: {sorted(self)}")
    return self[name]
