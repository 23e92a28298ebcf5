"""Multi-host start-up and the few host-side collectives the trainers need.

JAX runs one Python process per host (multi-controller): every process executes the same
program, owns its local devices and feeds them its share of each global batch. This module
starts that runtime from the config (`initialize`) and offers small host-level helpers built on
`jax.experimental.multihost_utils`, so that the training code stays the same on one CPU and on
a pod:

* `initialize(cfg)`: `jax.distributed.initialize` from the `distributed.*` config keys, from
  JAX's own cluster detection (TPU pod slices, SLURM, Open MPI, ...), or not at all on a single
  plain host.
* `process_max`, `process_sum`, `any_process`, `gather_rows`: agree on a shape, global counts,
  a stop flag, or the rows of a global batch. With one process they are plain local operations (no collective at all).
* `main_process_first`: process 0 writes shared files (generated data, a trained tokenizer)
  before the others read them.

Every helper is a collective when there are several processes: all processes must call it, in
the same order, or the run hangs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from recllm_jax.errors import ConfigError

log = logging.getLogger(__name__)

# distributed.<key> -> its "unset" value (the contract of configs/sft.py:base_config).
UNSET = {"coordinator_address": "", "num_processes": 0, "process_id": -1}


def detect_cluster() -> tuple[str, int] | None:
  """(name, process count) of the cluster environment JAX would auto-detect, else None.

  Uses the environments `jax.distributed.initialize()` itself knows (Cloud TPU VMs and GKE,
  SLURM, Open MPI, Kubernetes, ...; opt-in ones like mpi4py are skipped). This reads JAX's
  private `clusters` registry, so any failure there counts as "no cluster".
  """
  try:
    from jax._src import clusters
    envs = list(clusters.ClusterEnv._cluster_types)
  except (ImportError, AttributeError):
    return None
  for env in envs:
    if getattr(env, "opt_in_only_method", False):
      continue
    try:
      if env.is_env_present():
        return env.__name__, int(env.get_process_count())
    except Exception as e:  # e.g. a half-configured environment: treat as absent, say why
      log.debug("cluster detection %s failed: %s", env.__name__, e)
  return None


def _check_keys(dc: Any) -> tuple[str, int, int] | None:
  """The explicit (address, count, id), None when all keys are unset; ConfigError otherwise."""
  values = {k: dc.get(k, unset) for k, unset in UNSET.items()}
  missing = [f"distributed.{k}" for k, v in values.items() if v == UNSET[k]]
  if len(missing) == len(UNSET):
    return None
  if missing:
    given = ", ".join(f"distributed.{k}={v!r}" for k, v in values.items() if v != UNSET[k])
    verb = "is" if len(missing) == 1 else "are"
    raise ConfigError(f"{given} is set but {' and '.join(missing)} {verb} not: set all three "
                      "distributed keys, or none (cluster auto-detection)")
  address, count, index = values["coordinator_address"], values["num_processes"], values["process_id"]
  host, _, port = str(address).rpartition(":")
  if not host or not port.isdigit():
    raise ConfigError(f"distributed.coordinator_address={address!r} must be 'host:port'")
  if count < 1:
    raise ConfigError(f"distributed.num_processes={count} must be >= 1")
  if not 0 <= index < count:
    raise ConfigError(f"distributed.process_id={index} must be in [0, {count}) "
                      f"(distributed.num_processes={count})")
  return str(address), int(count), int(index)


def _enable_cpu_collectives() -> None:
  """Cross-process collectives for the CPU backend (no effect on GPU/TPU backends).

  Without them a multi-process CPU run fails at its first cross-process computation.
  """
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(cfg: ml_collections.ConfigDict) -> None:
  """Starts JAX's multi-host runtime as `cfg.distributed` says; call before any JAX computation.

  * All three keys set (`coordinator_address` 'host:port', `num_processes`, `process_id`):
    `jax.distributed.initialize` with them (e.g. several processes on localhost).
  * None set: if a cluster environment with more than one process is detected
    (`detect_cluster`), `jax.distributed.initialize()` with JAX's auto-detection; on a single
    plain host nothing is initialised.
  * Some set: ConfigError naming the missing keys.

  A config without a `distributed` block (an older saved config) counts as all unset. Calling
  this again after the runtime is up does nothing.
  """
  block = cfg.get("distributed")
  explicit = _check_keys({} if block is None else block)
  if jax.distributed.is_initialized():
    return
  if explicit is None:
    cluster = detect_cluster()
    if cluster is None or cluster[1] <= 1:
      return  # one plain host: JAX's single-process default
    log.info("detected a %s cluster of %d processes", *cluster)
    _enable_cpu_collectives()
    jax.distributed.initialize()
  else:
    address, count, index = explicit
    _enable_cpu_collectives()
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index)
  log.info("process %d of %d; %d local of %d devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


# --- host-side collectives (plain local operations with one process) ---------------------------


def _allgather(x: np.ndarray) -> np.ndarray:
  """[P, *x.shape]: `x` of every process, in process order."""
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


def process_max(value: int) -> int:
  """The largest `value` over all processes (e.g. a padded length every process must use)."""
  if jax.process_count() == 1:
    return int(value)
  return int(_allgather(np.int64(value)).max())


def process_sum(values: Mapping[str, int]) -> dict[str, int]:
  """Each count summed over all processes (e.g. per-batch event counts of each host's rows).

  Every process must pass the same keys in the same order.
  """
  if jax.process_count() == 1:
    return {k: int(v) for k, v in values.items()}
  totals = _allgather(np.asarray(list(values.values()), np.int64)).sum(0)  # [P, K] -> [K]
  return {k: int(t) for k, t in zip(values, totals)}


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (e.g. a stop request seen by one host)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(_allgather(np.int32(bool(flag))).any())


def gather_rows(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every process's rows of each array, concatenated along axis 0 in process order.

  Process p's rows land at [p * n, (p + 1) * n): with contiguous per-process blocks this is the
  global batch. Shapes must agree across processes (pad to `process_max` first).
  """
  if jax.process_count() == 1:
    return dict(arrays)
  # [P, n, ...] -> [P * n, ...]
  return {k: (lambda g: g.reshape(-1, *g.shape[2:]))(_allgather(v)) for k, v in arrays.items()}


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def main_process_first(name: str) -> Iterator[None]:
  """Process 0 runs the block first; the others run it once it is done.

  For blocks that create shared files on first use (synthetic data, a tokenizer trained into
  the workdir): process 0 writes them, the others then find and reuse them.
  """
  if jax.process_index() != 0:
    barrier(name)
  yield
  if jax.process_index() == 0:
    barrier(name)


__all__ = ["UNSET", "any_process", "barrier", "detect_cluster", "gather_rows", "initialize",
           "main_process_first", "process_max", "process_sum"]
