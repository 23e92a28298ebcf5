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

import ast
import logging
import re
import shlex
import sys
from pathlib import Path
from typing import NoReturn

# Config files may share pieces (`from configs.sft import base_config`), wherever we run from.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a preset: configs/sft.py:tiny (presets below)",
    lock_config=True)
flags.mark_flags_as_required(["config"])
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the resolved config (the preset with every --config.<key> "
    "override applied: all keys and values) and exit.")

USER_ERROR_STATUS = 2  # like argparse: the command line or its inputs are wrong
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
HELP_ARGS = ("-h", "-?", "--help", "-help", "--helpshort", "--helpfull")


def _one_line(text: str) -> str:
  return " ".join(line.strip() for line in text.splitlines() if line.strip())


def fail(problem: str | BaseException) -> NoReturn:
  """Prints `error: <problem>` on stderr and exits with USER_ERROR_STATUS.

  A message is one line. An exception prints as `error: <Type>: <message>`, one line for each
  of the errors a `recllm_jax.errors.UserErrors` holds.
  """
  if isinstance(problem, BaseException):
    lines = [f"{type(e).__name__}: {_one_line(str(e))}" for e in getattr(problem, "errors", None)
             or [problem]]
  else:
    lines = [_one_line(problem)]
  for line in lines:
    print(f"error: {line}", file=sys.stderr)
  sys.exit(USER_ERROR_STATUS)


def config_presets(path: Path) -> list[tuple[str, str]]:
  """(name, one-line summary) of each preset of a config file, read without importing it.

  The names are the keys of its `PRESETS` dict; the summaries come from the `Presets` section
  of its docstring (`  name  summary` lines); a preset without one says so.
  """
  tree = ast.parse(path.read_text(), str(path))
  names: list[str] = []
  for node in tree.body:
    if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PRESETS" for t in node.targets)
        and isinstance(node.value, ast.Dict)):
      names = [k.value for k in node.value.keys if isinstance(k, ast.Constant) and k.value]
  doc = ast.get_docstring(tree) or ""
  section = doc.partition("Presets")[2].partition("\n\n")[0]
  summaries = {}
  for line in section.splitlines()[1:]:
    name, _, summary = line.strip().partition(" ")
    summaries[name] = summary.strip()
  return [(name, summaries.get(name, "(not described in the file's docstring)")) for name in names]


def help_text(flag_values: flags.FlagValues = flags.FLAGS) -> str:
  """The running script's docstring, its flags (with --config and --print_config), the presets of
  every config file, and how to see all config keys."""
  script = Path(sys.argv[0]).stem
  lines = [(sys.modules["__main__"].__doc__ or "").strip(), "", "Flags:"]
  for module, module_flags in flag_values.flags_by_module_dict().items():
    if Path(module).stem not in (script, "train"):
      continue
    for flag in sorted(module_flags, key=lambda f: f.name):
      default = "" if flag.default is None else f" (default: {flag.default_as_str})"
      lines.append(f"  --{flag.name}: {_one_line(flag.help)}{default}")
  lines += ["", "Presets (--config FILE:PRESET; FILE alone is the default preset):"]
  rows = [(f"configs/{path.name}" + (f":{name}" if name else ""), summary)
          for path in sorted(CONFIGS_DIR.glob("*.py"))
          for name, summary in config_presets(path) or [("", "(no presets)")]]
  width = max(len(spec) for spec, _ in rows)
  lines += [f"  {spec.ljust(width)}  {summary}" for spec, summary in rows]
  lines += ["", "Every config key, with its value: add --print_config. Override any key with "
            "--config.<key>=<value>", "(nested keys with dots: --config.train.lr=1e-3)."]
  return "\n".join(lines)


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
  """absl flag parsing with every user error reported by `fail` as one line; `-h`/`--help`
  print `help_text` and exit 0.

  `flag_values`: the flags to parse into (tests pass their own `FlagValues`).
  """
  if any(arg in HELP_ARGS for arg in argv[1:]):
    print(help_text(flag_values))
    sys.exit(0)
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


LOG_FILE = "train.log"  # in the workdir: every log line with its time, level and logger


class _ConsoleFormatter(logging.Formatter):
  """The message alone for INFO, `warning: ...` / `error: ...` above: what a person reads. The
  log file keeps time, level and logger."""

  def format(self, record: logging.LogRecord) -> str:
    message = super().format(record)
    return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


def start_script(argv: list[str]) -> None:
  """Shared start of the config-driven scripts: no stray arguments, a concise INFO console."""
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; set config keys as --config.<key>=<value>")
  console = logging.StreamHandler(sys.stderr)
  console.setFormatter(_ConsoleFormatter())
  console.setLevel(logging.INFO)
  root = logging.getLogger()
  root.handlers = [console]  # replaces absl's handler and its `I1204 20:36:48.27 ...] ` prefix
  root.setLevel(logging.INFO)
  logging.getLogger("recllm_jax").setLevel(logging.DEBUG)  # details (DEBUG) reach the log file
  logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs every save step at INFO.
  logging.getLogger("jax").setLevel(logging.WARNING)  # e.g. "Unable to initialize backend 'tpu'"


def log_to_file(path: Path) -> None:
  """Every log line, DEBUG details included, also goes to `path` (appended: resumes add on)."""
  handler = logging.FileHandler(path)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  handler.setLevel(logging.DEBUG)
  logging.getLogger().addHandler(handler)


def command_line() -> str:
  """The command the user ran, as they would type it again."""
  return " ".join(shlex.quote(arg) for arg in ["python", *sys.argv])


def load_config(flag_values: flags.FlagValues = flags.FLAGS):
  """The parsed `--config`; a config file that fails to load ends in `fail` (one line).
  With `--print_config` it prints the config and exits 0.

  ml_collections defers a config file's load error to the first access, so this touches it.
  """
  config = flag_values.config
  try:
    config.get("workdir")
  except OSError as e:
    fail(_config_file_error(e, config_flags.get_config_filename(flag_values["config"])))
  if getattr(flag_values, "print_config", False):  # (tests parse into FlagValues without it)
    print(config)
    sys.exit(0)
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
      if jax.process_index() == 0 and "://" not in workdir:
        log_to_file(Path(workdir) / LOG_FILE)
        logging.getLogger(__name__).debug("command: %s", command_line())
      row = train(config)
  except UserError as e:
    fail(e)
  if jax.process_index() == 0:
    print(summary_line(config, workdir, row), file=sys.stderr)


def summary_line(config, workdir: str, row: dict) -> str:
  """What ran, how it ended and where its outputs are, in one line."""
  ended = f"step {row['step']}/{config.train.num_steps}" if row else "no step logged"
  if "loss" in row:
    ended += f", loss {row['loss']:.4g}"
  return (f"done: {command_line()}: {ended}; outputs in {workdir} (checkpoints/, metrics.jsonl, "
          f"{LOG_FILE})")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
