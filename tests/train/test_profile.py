"""`profile.steps=N:M` writes a jax.profiler trace of those steps into `<workdir>/profile`;
`profile.steps` and `train.master_dtype` are checked at start-up."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import data_dir, make_config  # noqa: E402,F401  (the small SFT setup + fixture)


def test_profile_steps_write_a_trace_into_the_workdir(tmp_path, data_dir):  # noqa: F811
  from etils import epath

  from recllm_jax.train.loop import train

  # Every workdir file goes through `paths.workdir_path` (epath), the code path of gs:// runs.
  workdir = epath.Path(tmp_path / "run")
  train(make_config(workdir, data_dir, **{"train.num_steps": 3, "profile.steps": "2:2"}))
  traces = list((tmp_path / "run" / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == 3
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["3"]


@pytest.mark.parametrize("spec", ["2", "3:2", "0:1", "a:b", "2:"])
def test_bad_profile_steps_are_a_config_error_naming_the_key(tmp_path, spec):
  from recllm_jax.errors import ConfigError
  from recllm_jax.train.loop import train

  config = make_config(tmp_path / "w", tmp_path, **{"profile.steps": spec})
  with pytest.raises(ConfigError, match=re.escape(f"profile.steps={spec!r} must be 'N:M'")):
    train(config)


def test_master_dtype_needs_low_precision_params(tmp_path):
  from recllm_jax.errors import ConfigError
  from recllm_jax.train.loop import train

  config = make_config(tmp_path / "w", tmp_path, **{"train.master_dtype": "float32"})
  with pytest.raises(ConfigError, match=r"train.master_dtype='float32'.*model.param_dtype="
                                        r"'float32' already is fp32"):
    train(config)
  config = make_config(tmp_path / "w", tmp_path, **{"train.master_dtype": "float16",
                                                    "model.param_dtype": "bfloat16"})
  with pytest.raises(ConfigError, match=r"train.master_dtype='float16'; expected"):
    train(config)
