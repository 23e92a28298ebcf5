"""The semantic-ID model learns to recommend: on synthetic data, trained from scratch with the
`office` recipe (SIDs built by RQ-KMeans, whole user sequences, loss on every history item), its
plain constrained beam beats popularity on the held-out test users."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from configs import sft as sft_configs  # noqa: E402  (configs/ is not an installed package)


@pytest.mark.slow
def test_sid_model_beats_popularity_on_held_out_users(tmp_path):
  import recllm_jax
  from recllm_jax.data.loading import load_dataset, load_run_data
  from recllm_jax.data.prompts import PromptConfig
  from recllm_jax.data.sids import SID_FILE, build_sids, write_sid_file
  from recllm_jax.data.synthetic import generate_synthetic
  from recllm_jax.inference import recommend
  from recllm_jax.rec.baselines import PopularityRecommender
  from recllm_jax.rec.metrics import evaluate_rankings
  from recllm_jax.data.catalog import popularity
  from recllm_jax.train.loop import train

  data = generate_synthetic(tmp_path / "data", seed=0)
  config = sft_configs.get_config("office")
  config.update_from_flattened_dict({
      "workdir": str(tmp_path / "sft"), "data.dir": str(data), "data.format": "synthetic",
      "train.num_steps": 300, "train.batch_size": 16, "train.eval_every": 0,
      "train.checkpoint_every": 0, "train.log_every": 50})
  raw = load_dataset(data, "synthetic")
  sids = build_sids(raw.catalog, [ex.history + ex.targets for ex in raw.train],
                    codebook_size=16, seed=0)
  write_sid_file(data / SID_FILE, sids)
  train(config)

  dataset, codec = load_run_data(config, tmp_path / "sft")
  model, tokenizer, run_config = recllm_jax.load_checkpoint(tmp_path / "sft")
  prompt_cfg = PromptConfig(**run_config.data.prompt.to_dict())
  test = dataset.test
  ranked = recommend(model, tokenizer, test, codec, prompt_cfg, k=10, batch_size=64)
  counts = popularity(dataset.train)
  ours = evaluate_rankings(ranked, test, dataset.catalog, counts, [10])
  pop = evaluate_rankings(PopularityRecommender.fit(dataset.train, dataset.catalog)
                          .recommend(test, 10), test, dataset.catalog, counts, [10])
  print(f"SID model ndcg@10 {ours['ndcg@10']:.4f} hr@10 {ours['hr@10']:.4f}; popularity "
        f"{pop['ndcg@10']:.4f} / {pop['hr@10']:.4f} ({len(test)} test rows)")
  assert ours["valid_rate"] == 1.0
  assert ours["ndcg@10"] > 1.5 * pop["ndcg@10"] and ours["hr@10"] > pop["hr@10"]
