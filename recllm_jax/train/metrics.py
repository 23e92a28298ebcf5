"""Training metrics: metrics.jsonl + TensorBoard + a tqdm bar, throughput and MFU.

MFU (model FLOPs utilisation) uses the PaLM convention (Chowdhery et al. 2022, app. B):

  FLOPs per trained token = 6 * N + 12 * L * H * Dh * T

N counts parameters that do matmuls (every weight except the input-embedding lookup; a tied
embedding counts once, as the LM head), 6 = 2 (multiply-add) x 3 (forward + two backward
matmuls). The second term is attention's QK^T and AV matmuls (L layers, H query heads of
width Dh, sequence length T), without discounting the causal mask. Remat recomputation is
*not* counted: MFU measures useful work, so remat lowers it.
MFU = tokens/s * FLOPs per token / peak FLOP/s of all devices.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from recllm_jax import paths
from recllm_jax.models.config import Qwen2Config

# Dense peak FLOP/s per device for bf16 matmuls (vendor datasheets, no sparsity).
PEAK_FLOPS_BF16 = {
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
    "L4": 121e12, "A10": 125e12, "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def matmul_params(cfg: Qwen2Config) -> int:
  """N in 6N: parameters used in matmuls (excludes the embedding lookup, norms and biases)."""
  d, f, h, k, dh = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                    cfg.num_key_value_heads, cfg.head_dim)
  per_layer = d * h * dh * 2 + d * k * dh * 2 + 3 * d * f  # q, o, k, v, gate/up/down
  return cfg.num_hidden_layers * per_layer + d * cfg.vocab_size  # + LM head


def flops_per_token(cfg: Qwen2Config, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), see the module docstring."""
  attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
  return 6.0 * matmul_params(cfg) + attention


def measure_matmul_flops(n: int = 2048, dtype: Any = jnp.float32, repeats: int = 5) -> float:
  """Achieved FLOP/s of a jitted n x n matmul on the default device (best of `repeats`)."""
  x = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


def peak_flops_per_device(configured: float = 0.0, dtype: Any = jnp.bfloat16) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the number came from).

  `configured` > 0 wins. Known accelerators use the datasheet table; anything else (CPU)
  measures a fp32 matmul, which is the practical peak there.
  """
  if configured > 0:
    return configured, "train.peak_flops"
  kind = jax.devices()[0].device_kind
  for name, flops in PEAK_FLOPS_BF16.items():
    if name.lower() in kind.lower():
      return flops, f"datasheet bf16 peak of {kind}"
  return measure_matmul_flops(), f"measured fp32 matmul on {kind}"


class Throughput:
  """Tokens/s and MFU over the interval between two `update` calls.

  Tasks report the work of each step (`add(tokens, flops)`): SFT counts `flops_per_token` per
  trained token; GRPO adds its rollout and extra forward passes (see `GrpoTask`).
  """

  def __init__(self, peak_flops_total: float):
    self._peak = peak_flops_total
    self._tokens = 0
    self._flops = 0.0
    self._start = time.perf_counter()

  def add(self, tokens: int, flops: float) -> None:
    self._tokens += tokens
    self._flops += flops

  def update(self) -> dict[str, float]:
    now = time.perf_counter()
    dt = max(now - self._start, 1e-9)
    out = {"tokens_per_sec": self._tokens / dt,
           "mfu": self._flops / dt / self._peak if self._peak else 0.0}
    self._tokens, self._flops, self._start = 0, 0.0, now
    return out


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch's, per compile
_compiles: list[int] = []  # XLA compilations seen by the listener; empty: not counting yet


def count_compiles() -> None:
  """Starts counting this process's XLA compilations for `host_metrics` (once per process)."""
  if _compiles:
    return
  _compiles.append(0)

  def listener(event: str, duration: float, **kwargs: Any) -> None:
    if event == _COMPILE_EVENT:
      _compiles[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)


def host_rss_mb() -> float:
  """This process's resident host memory in MiB: now on Linux (/proc), elsewhere the peak."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
  except (OSError, ValueError, IndexError):
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def host_metrics() -> dict[str, float]:
  """`host_rss_mb` (now) and `xla_compiles`: the XLA compilations of this process since
  `count_compiles` (cumulative: a count that still grows after the first steps, evaluation and
  checkpoint means something recompiles)."""
  return {"host_rss_mb": host_rss_mb(), "xla_compiles": _compiles[0] if _compiles else 0}


def progress_fields(row: Mapping[str, Any]) -> dict[str, str]:
  """The progress bar's short summary of a logged row (loss or reward, tokens/s)."""
  fields = {"loss": f"{row['loss']:.4f}"} if "loss" in row else {}
  if "reward" in row:
    fields["reward"] = f"{row['reward']:.3f}"
  if "tokens_per_sec" in row:
    fields["tok_s"] = f"{row['tokens_per_sec']:.0f}"
  return fields


def _scalar(v: Any) -> float | int:
  v = np.asarray(v)
  return v.item() if v.size == 1 else float(v.mean())


class MetricsWriter:
  """Appends rows to `<workdir>/metrics.jsonl` and TensorBoard; only process 0 writes.

  On resume, rows at or after the restored step are dropped from metrics.jsonl first, so the
  file always describes one consistent run (the killed run's unsaved steps are replayed).
  """

  def __init__(self, workdir: str | os.PathLike, resume_step: int = 0):
    self.active = jax.process_index() == 0
    workdir = paths.workdir_path(workdir)  # may be gs://: tensorboardX writes there too
    self.path = workdir / "metrics.jsonl"
    self._tb = None
    if not self.active:
      return
    self._truncate(resume_step)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(workdir / "tensorboard"))
    except ImportError:  # TensorBoard is optional.
      pass

  def rewind(self, step: int) -> None:
    """Drops the rows after `step` (a resume that fell back past a damaged checkpoint)."""
    if self.active:
      self._truncate(step)

  def _truncate(self, resume_step: int) -> None:
    if not self.path.exists():
      return
    kept = [line for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= resume_step]
    self.path.write_text("".join(line + "\n" for line in kept))

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    row = {"step": int(step), **{k: _scalar(v) for k, v in metrics.items()}}
    if self.active:
      paths.append_text(self.path, json.dumps(row) + "\n")  # closed at once: readable live
      if self._tb is not None:
        for k, v in row.items():
          if k != "step":
            self._tb.add_scalar(k, v, step)
    return row

  def write_text(self, tag: str, text: str, step: int) -> None:
    """A text entry in TensorBoard (e.g. GRPO's sampled completions)."""
    if self.active and self._tb is not None:
      self._tb.add_text(tag, text, step)

  def close(self) -> None:
    if self.active:
      if self._tb is not None:
        self._tb.close()


def progress_bar(total: int, initial: int):
  """A tqdm bar (loss, tokens/s, ETA) on process 0; a no-op elsewhere."""
  from recllm_jax import progress

  return progress.bar(total=total, initial=initial, disable=jax.process_index() != 0,
                      dynamic_ncols=True, desc="train")


__all__ = ["MetricsWriter", "PEAK_FLOPS_BF16", "Throughput", "count_compiles", "flops_per_token",
           "host_metrics", "host_rss_mb", "matmul_params", "measure_matmul_flops",
           "peak_flops_per_device", "progress_bar", "progress_fields"]
