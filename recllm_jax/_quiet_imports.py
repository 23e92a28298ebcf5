"""Keeps expected, harmless import-time notices of dependencies off the user's terminal.

`transformers` (used here for tokenizers and HF export only) logs "PyTorch was not found.
Models won't be available..." when imported without torch, which is how this JAX package is
normally installed (torch is a test extra). The notice is filtered by its text on the
`transformers` logger, so every other transformers warning still shows and no environment
variable (`TRANSFORMERS_VERBOSITY`, `TRANSFORMERS_NO_ADVISORY_WARNINGS`) is changed for the user.
"""

from __future__ import annotations

import logging

__all__ = ["silence_missing_torch_notice"]

_NOTICE = "PyTorch was not found"


class _DropMissingTorchNotice(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOTICE)


def silence_missing_torch_notice() -> None:
  """Installs the filter on the `transformers` logger (idempotent; call before importing it)."""
  logger = logging.getLogger("transformers")
  if not any(isinstance(f, _DropMissingTorchNotice) for f in logger.filters):
    logger.addFilter(_DropMissingTorchNotice())
