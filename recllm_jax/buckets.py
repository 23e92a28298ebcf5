"""Sequence-length buckets: the one place that decides which padded lengths `jit` compiles for.

Padding every batch to one of a few lengths bounds the number of compiled programs. Two
policies, because the two users differ in what padding costs and in whether a maximum is known:

* `linear_buckets` (training batches, `recllm_jax.data.pipeline`): sequences are capped at a
  known `data.max_length`, and every padded position costs a full forward *and* backward pass,
  so a few evenly spaced lengths keep the waste small (at most one spacing step).
* `geometric_bucket` (prompt prefill, `recllm_jax.decoding`): prompt lengths have no cap known
  in advance, and prefill is cheap next to decoding, so powers of two (at most 2x padding) give
  few programs for any length.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["geometric_bucket", "linear_buckets", "round_up", "smallest_bucket"]


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= `n`."""
  return -(-n // multiple) * multiple


def linear_buckets(max_length: int, num_buckets: int = 4, multiple: int = 16) -> tuple[int, ...]:
  """`num_buckets` evenly spaced lengths up to `max_length`, rounded up to `multiple`.

  The last bucket is `max_length` itself; duplicates (short `max_length`) collapse.
  """
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2, got {max_length}")
  if num_buckets < 1:
    raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
  # Bucket i holds up to ceil((i + 1) / num_buckets * max_length), rounded up to `multiple`.
  lengths = {min(max_length, round_up(-(-max_length * (i + 1) // num_buckets), multiple))
             for i in range(num_buckets)}
  return tuple(sorted(lengths))


def geometric_bucket(n: int, minimum: int = 64, geometric_up_to: int = 1024,
                     then_multiple_of: int = 512) -> int:
  """The bucket for a length `n` with no known cap: powers of two from `minimum` up to
  `geometric_up_to`, then multiples of `then_multiple_of` (doubling a long prompt's padding
  would cost more than a few extra programs)."""
  if n <= geometric_up_to:
    return max(minimum, 1 << max(0, int(n - 1).bit_length()))
  return round_up(n, then_multiple_of)


def smallest_bucket(buckets: Sequence[int], n: int) -> int:
  """The smallest of the sorted `buckets` that holds `n`; ValueError if none does."""
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"a sequence of {n} positions exceeds the largest bucket {buckets[-1]}")
