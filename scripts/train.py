"""Train a recommender LLM: `python scripts/train.py --config configs/sft.py[:preset]`.

Override any config key with `--config.key=value` (e.g. `--config.train.num_steps=50`);
unknown keys are rejected. Re-running the same command resumes from the latest checkpoint in
`--config.workdir`; SIGTERM (a preemption notice) saves at the next step boundary and exits 0.

Multi-host: run the same command on every host (one process each). JAX detects TPU pod slices
and SLURM / Open MPI jobs by itself; elsewhere (e.g. several processes on one machine) set
`--config.distributed.coordinator_address=host:port --config.distributed.num_processes=N
--config.distributed.process_id=i` (docs/multihost.md).

A user error (a bad flag or config value, a missing path, bad data, a diverged run: any
`recllm_jax.errors.UserError`) ends with one line `error: ...` on stderr and exit status 2,
never a traceback; a traceback means a bug.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn

# Config files may share pieces (`from configs.sft import base_config`), wherever we run from.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a preset: configs/sft.py:tiny",
    lock_config=True)
flags.mark_flags_as_required(["config"])

USER_ERROR_STATUS = 2  # like argparse: the command line or its inputs are wrong


def fail(message: str) -> NoReturn:
  """Prints `error: <message>` as one line on stderr and exits with USER_ERROR_STATUS."""
  one_line = " ".join(line.strip() for line in message.splitlines() if line.strip())
  print(f"error: {one_line}", file=sys.stderr)
  sys.exit(USER_ERROR_STATUS)


def _innermost_user_error(error: BaseException) -> BaseException | None:
  """The original UserError behind `error`, if any.

  config_flags re-raises an exception from `get_config` with the traceback pasted into its
  text, and absl wraps that again; the original is at the end of the exception chain.
  """
  from recllm_jax.errors import UserError  # imports jax: keep `--help` fast

  found = None
  while error is not None:
    if isinstance(error, UserError):
      found = error
    error = error.__cause__ or error.__context__
  return found


def _unknown_key_message(error: BaseException, argv: list[str]) -> str | None:
  """A message for a `--config.<key>` that the locked config lacks, else None.

  ml_collections raises AttributeError(KeyError("'key'\\nDid you mean ...?")).
  """
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  key, _, hint = text.partition("\n")
  key = key.strip("'\"")
  flag = next((a for a in argv if a.startswith("--config.")
               and a.partition("=")[0].split(".")[-1] == key), None)
  if flag is None:
    return None
  return f"{flag}: no such config key. {hint.strip()}".strip()


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with user errors reported by `fail` (absl prints several lines)."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    message = _unknown_key_message(e, argv)
    if message is None:
      raise
    fail(message)
  except flags.Error as e:
    user_error = _innermost_user_error(e)
    if user_error is not None:
      fail(f"--config: {user_error}")
    if "Traceback" in str(e):
      raise  # a config file crashed: a bug, keep its traceback
    fail(str(e))


def start_script(argv: list[str]) -> None:
  """Shared start of the config-driven scripts: no stray arguments, INFO logs without noise."""
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; set config keys as --config.<key>=<value>")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO.
  logging.getLogger("jax").setLevel(logging.WARNING)  # e.g. "Unable to initialize backend 'tpu'"


def load_config():
  """The parsed `--config`; a config file that fails to load ends in `fail` (one line).

  ml_collections defers a config file's load error to the first access, so this touches it.
  """
  config = flags.FLAGS.config
  try:
    config.get("workdir")
  except OSError as e:
    cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
    fail(f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}: {cause}")
  return config


def main(argv: list[str]) -> None:
  start_script(argv)
  # Imported after flag parsing so that --help stays fast.
  import jax

  from recllm_jax import distributed
  from recllm_jax.errors import UserError
  from recllm_jax.train.loop import train

  config = load_config()
  try:
    # Before anything touches a JAX backend: multi-host runs start the distributed runtime here.
    distributed.initialize(config)
    if jax.process_index() != 0:  # one voice: INFO logs and the progress bar from process 0
      logging.getLogger().setLevel(logging.WARNING)
    train(config)
  except UserError as e:
    fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
