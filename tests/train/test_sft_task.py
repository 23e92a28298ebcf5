"""SftTask data wiring: history budgeting to data.max_length and the train_examples.txt preview."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from recllm_jax.data import pipeline
from recllm_jax.data.synthetic import generate_synthetic
from recllm_jax.errors import ConfigError
from recllm_jax.train.sft import TRAIN_EXAMPLES_FILE, SftTask

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from configs import sft as sft_configs  # noqa: E402  (configs/ is not an installed package)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
  return generate_synthetic(tmp_path_factory.mktemp("data"), num_items=60, num_users=30, seed=0)


@pytest.mark.parametrize("target_format", ["direct", "cot"])
def test_sft_task_writes_train_examples_under_the_r1_template(tmp_path, data_dir, r1_tokenizer,
                                                             target_format):
  config = sft_configs.get_config("tiny")
  config.data.dir = str(data_dir)
  config.model.tokenizer_path = r1_tokenizer.name_or_path
  config.data.prompt.target_format = target_format
  config.data.max_length = 384
  task = SftTask(config, tmp_path)
  text = (tmp_path / TRAIN_EXAMPLES_FILE).read_text(encoding="utf-8")
  # Exactly what the pipeline trains on for the first 8 examples.
  tokenize = pipeline.tokenize_fn(task._format, task.tokenizer, 384)
  assert text == pipeline.format_train_examples([tokenize(e) for e in task.dataset.train[:8]],
                                                task.tokenizer)
  blocks = text.split("===== example ")[1:]
  assert len(blocks) == 8
  for block in blocks:
    # One BOS (from the template), the loss starting right after the template's "<think>\n",
    # and an EOS at the end of the trained text.
    assert block.count("<｜begin▁of▁sentence｜>") == 1
    prompt, completion = block.split(f"<｜Assistant｜><think>\n{pipeline.LOSS_MARKER}\n")
    assert completion.endswith("<｜end▁of▁sentence｜>\n\n") and "<think>" not in completion
    assert completion.startswith("\n</think>\n\n" if target_format == "direct" else "The most recent item")


def test_history_loss_with_no_item_in_the_history_lines_is_a_config_error(tmp_path, data_dir,
                                                                         r1_tokenizer):
  from recllm_jax.errors import ConfigError

  config = sft_configs.get_config("tiny")
  config.data.dir = str(data_dir)
  config.model.tokenizer_path = r1_tokenizer.name_or_path
  config.data.history_loss = True
  SftTask(config, tmp_path)  # the default lines show {item}
  assert "trained history tokens in [[ ]]" in (tmp_path / TRAIN_EXAMPLES_FILE).read_text()
  config.data.prompt.history_item_template = "{index}.{details}\n"  # no item text at all
  with pytest.raises(ConfigError, match=r"history_item_template='\{index\}\.\{details\}\\n'"):
    SftTask(config, tmp_path)


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_history_dropout_outside_zero_to_one_is_a_config_error(rate):
  config = sft_configs.get_config("tiny")
  config.data.history_dropout = rate
  with pytest.raises(ConfigError, match=r"data.history_dropout=.* must be in \[0, 1\)"):
    SftTask.check_config(config)


def test_history_dropout_trains_on_examples_with_items_dropped(tmp_path, data_dir):
  config = sft_configs.get_config("tiny")
  config.data.dir = str(data_dir)
  config.data.history_dropout = 0.5
  task = SftTask(config, tmp_path)
  augment = task.pipeline_config.augment
  ex = next(e for e in task.dataset.train if len(e.history) >= 6)
  rng = np.random.default_rng(0)
  lengths = {len(augment(ex, rng).history) for _ in range(20)}
  assert max(lengths) <= len(ex.history) and min(lengths) < len(ex.history) and len(lengths) > 1
  config.data.history_dropout = 0.0
  assert SftTask(config, tmp_path / "off").pipeline_config.augment is None
