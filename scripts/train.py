"""Train a recommender LLM: `python scripts/train.py --config configs/sft.py[:preset]`.

Override any config key with `--config.key=value` (e.g. `--config.train.num_steps=50`);
unknown keys are rejected. Re-running the same command resumes from the latest checkpoint in
`--config.workdir`; SIGTERM (a preemption notice) saves at the next step boundary and exits 0.
One writer per workdir: a run holds `<workdir>/.lock` (process 0 takes it), and a second run on
that workdir stops at once with one line naming the holder (host, pid, start time), exit 2.

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
import re
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


_OVERRIDE = re.compile(r"-{1,2}(no)?config\.")  # as config_flags finds its overrides


def _config_arg(argv: list[str]) -> str | None:
  """The value of `--config` in `argv` (`--config=F[:preset]` or `--config F[:preset]`)."""
  for i, arg in enumerate(argv):
    name, eq, value = arg.partition("=")
    if name in ("-config", "--config"):
      return value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _config_file_error(error: BaseException, config_arg: str) -> str:
  """One line for a config file that cannot be loaded (missing, a directory, ...)."""
  cause = str(error.__cause__ or error).strip().splitlines()[-1].strip()
  return f"--config={config_arg.split(':', 1)[0]}: {cause}"


def _override_message(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS
                      ) -> str | None:
  """One line for the first `--config` or `--config.<key>` argument that cannot apply, else None.

  config_flags raises a bare KeyError / AttributeError / OSError for a key under a missing
  parent (`--config.model.nosuch.rank=8`), a key below a plain value (`--config.train.lr.x=1`)
  or a config file that cannot be loaded; this re-loads the config (its `get_config` is cheap)
  and walks each override's path to say which part is wrong.
  """
  from ml_collections import ConfigDict

  config_arg = _config_arg(argv)
  if config_arg is None:
    return None
  try:
    config = flag_values["config"].parser.parse(config_arg)  # config_flags' file parser
  except Exception:  # the config file itself crashed: not ours to explain
    return None
  try:
    config.keys()
  except OSError as e:  # ml_collections defers a load error to the first access
    return _config_file_error(e, config_arg)
  for arg in argv:
    if not _OVERRIDE.match(arg):
      continue
    flag = arg
    parts = arg.partition("=")[0].split(".", 1)[1].split(".")
    node = config
    for depth, part in enumerate(parts):
      where = ".".join(parts[:depth + 1])
      if not isinstance(node, ConfigDict):
        parent = ".".join(parts[:depth])
        return (f"{flag}: no such config key; {parent} is a {type(node).__name__} "
                f"({node!r}), not a group of keys")
      try:
        node = node[part]
      except KeyError as e:  # ConfigDict's text: "'key'\nDid you mean ...?"
        text = e.args[0] if e.args and isinstance(e.args[0], str) else ""
        hint = text.partition("\n")[2].strip()
        leaf = depth == len(parts) - 1
        return f"{flag}: no such config key{'' if leaf else f' {where!r}'}. {hint}".strip()
  return None


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl flag parsing with every user error reported by `fail` as one line.

  `flag_values`: the flags to parse into (tests pass their own `FlagValues`).
  """
  try:
    return flag_values(argv)
  except flags.Error as e:
    user_error = _innermost_user_error(e)
    if user_error is not None:
      fail(f"--config: {user_error}")
    if "Traceback" in str(e):
      raise  # a config file crashed: a bug, keep its traceback
    fail(str(e))
  except (AttributeError, KeyError, OSError, ValueError, TypeError):
    message = _override_message(argv, flag_values)
    if message is None:
      raise
    fail(message)


def start_script(argv: list[str]) -> None:
  """Shared start of the config-driven scripts: no stray arguments, INFO logs without noise."""
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; set config keys as --config.<key>=<value>")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO.
  logging.getLogger("jax").setLevel(logging.WARNING)  # e.g. "Unable to initialize backend 'tpu'"


def load_config(flag_values: flags.FlagValues = flags.FLAGS):
  """The parsed `--config`; a config file that fails to load ends in `fail` (one line).

  ml_collections defers a config file's load error to the first access, so this touches it.
  """
  config = flag_values.config
  try:
    config.get("workdir")
  except OSError as e:
    fail(_config_file_error(e, config_flags.get_config_filename(flag_values["config"])))
  return config


def main(argv: list[str]) -> None:
  start_script(argv)
  # Imported after flag parsing so that --help stays fast.
  import jax

  from recllm_jax import distributed
  from recllm_jax.errors import UserError
  from recllm_jax.train import workdir_lock
  from recllm_jax.train.checks import expand_paths
  from recllm_jax.train.loop import train

  config = load_config()
  try:
    # Before anything touches a JAX backend: multi-host runs start the distributed runtime here.
    distributed.initialize(config)
    if jax.process_index() != 0:  # one voice: INFO logs and the progress bar from process 0
      logging.getLogger().setLevel(logging.WARNING)
    # One writer per workdir, checked before any heavy work: process 0 holds the lock for the
    # job, the others never touch it (recllm_jax/train/workdir_lock.py).
    workdir = expand_paths(config).workdir  # `~` and `$VAR`, as train() will expand them
    with workdir_lock.hold(workdir, jax.process_index(), agree=distributed.any_process):
      train(config)
  except UserError as e:
    fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
