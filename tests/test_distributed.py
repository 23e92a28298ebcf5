"""`recllm_jax.distributed`: config-key validation, no runtime on a plain host, the host helpers."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from recllm_jax import distributed
from recllm_jax.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configs import baselines as baselines_configs  # noqa: E402
from configs import grpo as grpo_configs  # noqa: E402
from configs import sft as sft_configs  # noqa: E402

# Environment variables by which JAX's cluster detection recognises a multi-process job.
CLUSTER_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST", "SLURM_PROCID",
                "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "PMIX_SERVER_URI", "TPU_WORKER_HOSTNAMES",
                "KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR_ADDRESS")


def config(**distributed_keys):
  c = sft_configs.get_config("tiny")
  c.distributed.update(distributed_keys)
  return c


@pytest.fixture
def plain_host(monkeypatch):
  for var in CLUSTER_VARS:
    monkeypatch.delenv(var, raising=False)


def test_every_training_config_has_the_contract_keys():
  for c in (sft_configs.get_config("tiny"), grpo_configs.get_config("tiny"),
            grpo_configs.get_config()):
    assert dict(c.distributed) == {"coordinator_address": "", "num_processes": 0,
                                   "process_id": -1}
  assert "distributed" not in baselines_configs.get_config()  # a single-host tool


@pytest.mark.parametrize("keys, missing", [
    ({"coordinator_address": "127.0.0.1:1234"}, "distributed.num_processes and "
                                                "distributed.process_id are not"),
    ({"num_processes": 2, "process_id": 1}, "distributed.coordinator_address is not"),
    ({"coordinator_address": "h:1", "num_processes": 2}, "distributed.process_id is not"),
])
def test_partly_set_keys_name_the_missing_ones(keys, missing):
  with pytest.raises(ConfigError, match=missing):
    distributed.initialize(config(**keys))


@pytest.mark.parametrize("keys, message", [
    ({"coordinator_address": "localhost", "num_processes": 2, "process_id": 0}, "'host:port'"),
    ({"coordinator_address": "h:x", "num_processes": 2, "process_id": 0}, "'host:port'"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, r"in \[0, 2\)"),
    ({"coordinator_address": "h:1", "num_processes": -3, "process_id": 0}, ">= 1"),
])
def test_bad_explicit_keys_are_config_errors(keys, message):
  with pytest.raises(ConfigError, match=message):
    distributed.initialize(config(**keys))


def test_a_plain_host_initialises_nothing(plain_host, monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  assert distributed.detect_cluster() is None
  distributed.initialize(config())
  distributed.initialize(ml_collections.ConfigDict({"task": "sft"}))  # saved before the keys
  assert calls == [] and jax.process_count() == 1


def test_a_detected_cluster_uses_jax_auto_detection(plain_host, monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(distributed, "detect_cluster", lambda: ("SlurmCluster", 4))
  distributed.initialize(config())
  assert calls == [((), {})]  # no arguments: JAX reads the cluster itself
  calls.clear()
  monkeypatch.setattr(distributed, "detect_cluster", lambda: ("SlurmCluster", 1))
  distributed.initialize(config())  # a one-task job is a single host
  assert calls == []


def test_explicit_keys_are_passed_through(plain_host, monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  distributed.initialize(config(coordinator_address="10.0.0.1:8476", num_processes=2,
                                process_id=1))
  assert calls == [{"coordinator_address": "10.0.0.1:8476", "num_processes": 2,
                    "process_id": 1}]


def test_slurm_with_several_tasks_is_detected(plain_host, monkeypatch):
  for var, value in {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[1-2]",
                     "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
    monkeypatch.setenv(var, value)
  assert distributed.detect_cluster() == ("SlurmCluster", 2)


def test_host_helpers_are_local_with_one_process():
  assert distributed.process_max(7) == 7
  assert distributed.process_sum({"a": np.int32(3), "b": 0}) == {"a": 3, "b": 0}
  assert distributed.any_process(False) is False and distributed.any_process(True) is True
  rows = {"x": np.arange(6).reshape(3, 2)}
  np.testing.assert_array_equal(distributed.gather_rows(rows)["x"], rows["x"])
  with distributed.main_process_first("test"):
    pass


# --- the pipeline's per-process layout (processes simulated: jax.process_index/count patched) ---


def simulate(monkeypatch, index: int, count: int) -> None:
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_processes_read_contiguous_blocks_of_the_single_process_batches(monkeypatch,
                                                                        drop_remainder):
  from recllm_jax.data import pipeline

  ds = pipeline.source(list(range(22))).shuffle(seed=3)  # 22 = 2 full batches of 8 + 6
  single = list(pipeline.process_batches(ds, 8, list, drop_remainder=drop_remainder))
  blocks = []
  for p in range(2):
    simulate(monkeypatch, p, 2)
    blocks.append(list(pipeline.process_batches(ds, 8, list, drop_remainder=drop_remainder)))
  assert len(single) == len(blocks[0]) == len(blocks[1]) == (2 if drop_remainder else 3)
  for k, batch in enumerate(single):
    assert blocks[0][k] + blocks[1][k] == batch  # process p: rows [4p, 4p + 4)
  if not drop_remainder:  # the last global batch has 6 rows: 4 on process 0, 2 on process 1
    assert [len(blocks[0][2]), len(blocks[1][2])] == [4, 2]
  assert single[0] == [ds[i] for i in range(8)]
  simulate(monkeypatch, 1, 2)  # 18 rows: the last global batch (2 rows) is all on process 0
  assert list(pipeline.process_batches(ds[:18], 8, list, drop_remainder=False))[-1] == []


def test_batch_size_must_split_over_processes(monkeypatch):
  from recllm_jax.data import pipeline

  simulate(monkeypatch, 0, 3)
  with pytest.raises(ConfigError, match="train.batch_size=8 is not divisible by 3 processes"):
    pipeline.process_batches(pipeline.source([1, 2, 3]), 8, list)


def test_pad_columns_pads_only_row_arrays():
  from recllm_jax.data import pipeline

  batch = {"input_ids": np.array([[5, 6]]), "attention_mask": np.array([[1, 1]]),
           "example_index": np.array([9])}
  right = pipeline.pad_columns(batch, 4, pad_values={"input_ids": 7})
  np.testing.assert_array_equal(right["input_ids"], [[5, 6, 7, 7]])
  np.testing.assert_array_equal(right["attention_mask"], [[1, 1, 0, 0]])
  np.testing.assert_array_equal(right["example_index"], [9])
  left = pipeline.pad_columns(batch, 3, left=True)
  np.testing.assert_array_equal(left["input_ids"], [[0, 5, 6]])
