"""Bucket policies: linear buckets for training batches, geometric buckets for prompt prefill."""

from __future__ import annotations

import pytest

from recllm_jax import buckets
from recllm_jax.decoding import bucket_length


def test_linear_buckets():
  assert buckets.linear_buckets(1024) == (256, 512, 768, 1024)
  assert buckets.linear_buckets(100, 4) == (32, 64, 80, 100)  # 25, 50, 75 rounded up to 16
  assert buckets.linear_buckets(100, 3) == (48, 80, 100)  # ceil(33.3)=34 -> 48, 67 -> 80
  assert buckets.linear_buckets(64, 1) == (64,)
  assert buckets.linear_buckets(20, 4) == (16, 20)  # duplicates collapse
  with pytest.raises(ValueError, match="max_length"):
    buckets.linear_buckets(1)
  with pytest.raises(ValueError, match="num_buckets"):
    buckets.linear_buckets(64, 0)


def test_geometric_bucket_and_decoding_uses_it():
  lengths = (1, 64, 65, 128, 129, 1024, 1025, 1536, 1537)
  assert [buckets.geometric_bucket(n) for n in lengths] == [64, 64, 128, 128, 256, 1024, 1536, 1536, 2048]
  assert buckets.geometric_bucket(5, minimum=4) == 8
  assert [bucket_length(n) for n in lengths] == [buckets.geometric_bucket(n) for n in lengths]


def test_smallest_bucket_and_round_up():
  assert buckets.smallest_bucket((4, 8, 16), 5) == 8
  assert buckets.smallest_bucket((4, 8, 16), 16) == 16
  with pytest.raises(ValueError, match="17 positions exceeds the largest bucket 16"):
    buckets.smallest_bucket((4, 8, 16), 17)
  assert [buckets.round_up(n, 16) for n in (0, 1, 16, 17)] == [0, 16, 16, 32]
