"""Run directories that may be local or in a bucket (`gs://bucket/run`), through `etils.epath`.

On TPU VMs and preemptible GPU hosts the local disk dies with the machine, so a run's workdir
(checkpoints, metrics, config) belongs in a bucket. `epath.Path` speaks both: local paths go
through `os`, `gs://`/`s3://` URIs through fsspec (gcsfs) or `tf.io.gfile`, and Orbax takes
it as a checkpoint directory. Only the workdir's own files go through here; inputs that
libraries read from disk (data, HF weights, tokenizers) stay local paths.
"""

from __future__ import annotations

import os

from etils import epath

_URI_SEPARATOR = "://"


def is_uri(path: str | os.PathLike) -> bool:
  """`gs://...`, `s3://...`: a path that `os` cannot open (no `~`, no cwd, no append)."""
  return _URI_SEPARATOR in os.fspath(path)


def workdir_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an `epath.Path`: URIs untouched, local paths made absolute.

  Absolute because Orbax rejects relative checkpoint directories; not via `.absolute()`,
  which would prefix a URI with the cwd (`/cwd/gs:/bucket`). Never touches the file system.
  """
  path = os.fspath(path)
  return epath.Path(path if is_uri(path) else os.path.abspath(path))


def append_text(path: epath.Path, text: str) -> None:
  """Appends `text` to the file at `path` (created if missing).

  Object stores have no append (gcsfs silently truncates in mode 'a'), so a URI's file is
  read and written back whole: fine for the small logs we keep (metrics, samples).
  """
  if not is_uri(path):
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)
    return
  old = path.read_text(encoding="utf-8") if path.exists() else ""
  path.write_text(old + text, encoding="utf-8")


__all__ = ["append_text", "is_uri", "workdir_path"]
