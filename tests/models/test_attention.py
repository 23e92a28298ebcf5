"""The attention implementations (`Qwen2Config.attention`) against the einsum reference.

Every kernel that can run on this backend is compared with `einsum_attention` on the calls the
model makes: the training forward and its gradients (no cache, causal), a prefill into a longer
KV cache, a decode step (T=1) against a padded cache, and the shared-prompt `prefix` path.
  xla_api  `jax.nn.dot_product_attention(implementation='xla')` through our cuDNN wrapper
           (layouts, mask, padding rows, odd lengths): runs everywhere, fp32, rounding-tight.
  splash   the Pallas splash kernel, in Pallas' interpreter away from a TPU (fp32).
  cudnn    cuDNN flash attention: only on a GPU (skipped elsewhere), in bf16.
A bf16 kernel is held to our own bf16 einsum's accuracy: its max abs error against the fp32
einsum (same bf16-rounded inputs) must stay within BF16_FACTOR x the bf16 einsum's own.

With ATTN_PARITY_JSON=path, every comparison's max abs error is written there as JSON (and
printed with -s): `ATTN_PARITY_JSON=attn.json pytest tests/models/test_attention.py -q -s`.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recllm_jax.errors import ConfigError
from recllm_jax.models import fused_attention
from recllm_jax.models.config import Qwen2Config, resolve_attention
from recllm_jax.models.qwen2 import Qwen2ForCausalLM, attention, einsum_attention

BACKEND = jax.default_backend()
# fp32 kernels differ from the einsum only in summation order.
FP32_TOL = 2e-5
# A bf16 kernel may be at most this many times less accurate than the bf16 einsum (both against
# the fp32 einsum); the two round the same inputs and probabilities to bf16 but sum in different
# orders and tiles, so their errors are of the same size, not equal.
BF16_FACTOR = 2.0

# name -> (kernel(q, k, v, allowed, causal), compute dtype, only causal calls, runs here)
KERNELS = {
    "xla_api": (lambda q, k, v, a, causal: fused_attention.dot_product_attention(
        q, k, v, a, causal=causal, implementation="xla"), jnp.float32, False, True),
    "splash": (lambda q, k, v, a, causal: fused_attention.splash_attention(
        q, k, v, a, interpret=BACKEND != "tpu"), jnp.float32, True, True),
    "cudnn": (lambda q, k, v, a, causal: fused_attention.dot_product_attention(
        q, k, v, a, causal=causal, implementation="cudnn"), jnp.bfloat16, False, BACKEND == "gpu"),
}


def _kernel_params(causal: bool):
  return [pytest.param(name, marks=pytest.mark.skipif(not runs, reason=f"{name} needs a GPU"))
          for name, (_, _, causal_only, runs) in KERNELS.items() if causal or not causal_only]


@pytest.fixture(autouse=True)
def _exact_fp32_matmuls():
  """The fp32 einsum is the reference: on GPUs keep XLA from running its matmuls in TF32."""
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="session")
def parity():
  """Records {test: {what: max abs error}}; written to $ATTN_PARITY_JSON at the end."""
  records: dict[str, dict[str, float]] = {}
  yield records
  for test, errs in records.items():
    print(f"\n[attention parity] {test}: " + ", ".join(f"{k}={v:.3g}" for k, v in errs.items()))
  path = os.environ.get("ATTN_PARITY_JSON")
  if path:
    with open(path, "w") as f:
      json.dump({"backend": BACKEND, "devices": [str(d) for d in jax.devices()], **records}, f,
                indent=1, sort_keys=True)


def _max_err(a, b, rows=None) -> float:
  """Max abs difference; over `rows` ([B, T] bool, the real query rows) when given."""
  d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
  return float(d[np.asarray(rows)].max() if rows is not None else d.max())


def _check(parity, test: str, what: str, dtype, got, ref_fp32, ref_same_dtype, rows=None):
  """fp32: `got` within FP32_TOL of the fp32 einsum. bf16: within BF16_FACTOR x the bf16
  einsum's own error against it."""
  err = _max_err(got, ref_fp32, rows)
  entry = parity.setdefault(test, {})
  entry[f"{what}_max_abs_err"] = err
  if dtype == jnp.float32:
    assert err <= FP32_TOL * max(1.0, float(np.abs(np.asarray(ref_fp32)).max())), (what, err)
    return
  own = _max_err(ref_same_dtype, ref_fp32, rows)
  entry[f"{what}_einsum_bf16_max_abs_err"] = own
  assert err <= BF16_FACTOR * own, (what, err, own)


def _operands(seed: int, b: int, t: int, s: int, h: int = 4, kv: int = 2, dh: int = 16):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (b, t, h, dh))  # [B, T, H, Dh]
  k = jax.random.normal(ks[1], (b, kv, s, dh))  # [B, K, S, Dh]
  v = jax.random.normal(ks[2], (b, kv, s, dh))
  return q, k, v


def _allowed(kv_mask: np.ndarray, t: int, index: int) -> jax.Array:
  """[B, T, S] as `Qwen2ForCausalLM` builds it: real key slots up to each query's slot."""
  s = kv_mask.shape[1]
  causal = np.arange(s)[None, None, :] <= (np.arange(t) + index)[None, :, None]
  return jnp.asarray(kv_mask[:, None, :] & causal)


def _left_padded(b: int, s: int, pads) -> np.ndarray:
  return np.arange(s)[None, :] >= np.asarray(pads)[:, None]  # [B, S]


def _round(dtype, *xs):
  """The inputs rounded to `dtype`, and those same values in fp32 (the reference's inputs)."""
  low = [x.astype(dtype) for x in xs]
  return low, [x.astype(jnp.float32) for x in low]


# --- function level ---------------------------------------------------------------------------


# Odd T exercises the even-length padding of the cuDNN wrapper; 128 is one splash block.
@pytest.mark.parametrize("name", _kernel_params(causal=True))
@pytest.mark.parametrize("t", [7, 128])
def test_training_forward_and_grads_match_einsum(name, t, parity):
  kernel, dtype, _, _ = KERNELS[name]
  pads = (0, 3)
  (q, k, v), (q32, k32, v32) = _round(dtype, *_operands(0, 2, t, t))
  allowed = _allowed(_left_padded(2, t, pads), t, 0)
  rows = np.asarray(allowed.any(-1))  # left-padding query rows: nobody reads them
  w = jax.random.normal(jax.random.key(1), q.shape) * rows[:, :, None, None]

  @functools.partial(jax.jit, static_argnums=0)
  def run(fn, q, k, v):  # output, and the gradients of a loss over the real rows (as the model's)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    return fn(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)

  fused = lambda q, k, v: kernel(q, k, v, allowed, True)
  einsum = lambda q, k, v: einsum_attention(q, k, v, allowed)
  out, grads = run(fused, q, k, v)
  ref32, grads32 = run(einsum, q32, k32, v32)
  ref_low, grads_low = run(einsum, q, k, v)
  test = f"training[{name}, T={t}]"
  assert np.isfinite(np.asarray(out, np.float32)).all()  # padding rows too
  _check(parity, test, "out", dtype, out, ref32, ref_low, rows)
  for what, g, g32, g_low in zip("qkv", grads, grads32, grads_low):
    assert np.isfinite(np.asarray(g, np.float32)).all()
    _check(parity, test, f"d{what}", dtype, g, g32, g_low)


@pytest.mark.parametrize("name", _kernel_params(causal=False))
def test_prefill_into_a_longer_cache_matches_einsum(name, parity):
  """T=6 prompt slots written at index 0 of a 10-slot cache (the rest not yet real)."""
  kernel, dtype, _, _ = KERNELS[name]
  t, s = 6, 10
  kv_mask = _left_padded(3, s, (0, 2, 5)) & (np.arange(s) < t)[None]
  (q, k, v), (q32, k32, v32) = _round(dtype, *_operands(2, 3, t, s))
  allowed = _allowed(kv_mask, t, 0)
  out = jax.jit(lambda *a: kernel(*a, allowed, False))(q, k, v)
  einsum = jax.jit(lambda *a: einsum_attention(*a, allowed))
  # Without the causal flag even the all-padding rows equal the einsum's (uniform weights).
  _check(parity, f"prefill[{name}]", "out", dtype, out, einsum(q32, k32, v32), einsum(q, k, v))


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_decode_and_prefix_calls_fall_back_to_the_einsum_exactly(impl):
  """A decode step (T=1 against a padded 9-slot cache) and the shared-prefix path trace to the
  einsum's own program (so even bf16 results are bit-identical, on any platform)."""
  (q, k, v), _ = _round(jnp.bfloat16, *_operands(3, 4, 1, 9))
  allowed = _allowed(_left_padded(4, 9, (0, 1, 4, 6)) & (np.arange(9) < 8)[None], 1, 7)
  call = functools.partial(attention, impl=impl, causal=False)
  same = lambda *a: str(jax.make_jaxpr(call)(*a)) == str(jax.make_jaxpr(einsum_attention)(*a))
  assert same(q, k, v, allowed)
  (_, pk, pv), _ = _round(jnp.bfloat16, *_operands(4, 2, 1, 5))  # P=2 prompts, W=2 rows each
  prefix = (pk, pv, jnp.asarray(_left_padded(2, 5, (0, 2))))
  assert same(q, k, v, allowed, prefix)


def test_fallback_reasons():
  kw = {"dtype": jnp.bfloat16, "head_dim": 128, "query_len": 64, "causal": True, "prefix": False}
  assert fused_attention.fallback_reason("cudnn", **kw) is None
  assert fused_attention.fallback_reason("splash", **kw) is None
  assert "bf16" in fused_attention.fallback_reason("cudnn", **{**kw, "dtype": jnp.float32})
  assert "head dim" in fused_attention.fallback_reason("cudnn", **{**kw, "head_dim": 100})
  assert "T=1" in fused_attention.fallback_reason("cudnn", **{**kw, "query_len": 1})
  assert "prefix" in fused_attention.fallback_reason("cudnn", **{**kw, "prefix": True})
  assert "cache" in fused_attention.fallback_reason("splash", **{**kw, "causal": False})
  assert fused_attention.fallback_reason("xla", **kw) is not None


# --- config -----------------------------------------------------------------------------------


def test_invalid_attention_names_the_key_and_the_choices():
  with pytest.raises(ConfigError, match=r"model.attention='flash'.*'xla', 'cudnn', 'splash', "
                                        r"'auto'"):
    Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1, attention="flash")


def test_auto_resolves_per_platform_once():
  assert [resolve_attention("auto", p) for p in ("cpu", "gpu", "tpu")] == [
      "xla", "cudnn", "splash"]
  assert resolve_attention("cudnn", "cpu") == "cudnn"  # explicit: kept (refused when traced)
  cfg = Qwen2Config(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, attention="auto")
  assert cfg.attention == resolve_attention("auto", BACKEND)


@pytest.mark.skipif(BACKEND in ("gpu", "tpu"), reason="the kernels run on accelerators")
@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_a_kernel_off_its_platform_is_a_config_error(impl):
  with pytest.raises(ConfigError, match=f"model.attention='{impl}' needs"):
    fused_attention.check_platform(impl)
  cfg = _model_cfg(impl)  # the config itself can be made (plans for accelerators need it)
  with pytest.raises(ConfigError, match=f"model.attention='{impl}' needs"):
    _trace(cfg, lambda m: m(jnp.ones((1, 8), jnp.int32)))  # refused when traced


# --- the model --------------------------------------------------------------------------------


def _trace(cfg: Qwen2Config, call):
  """Traces `call(model)` on an abstract model: shapes only, nothing is compiled or allocated."""
  return nnx.eval_shape(lambda: call(Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))))


def test_the_model_passes_its_choice_and_causality_to_attention(monkeypatch):
  """Cache-free forwards are causal calls of `cfg.attention`; prefill and decode are not."""
  from recllm_jax.models import qwen2

  calls = []
  real = qwen2.attention

  def spy(*args, **kwargs):
    calls.append((kwargs["impl"], kwargs["causal"], args[0].shape[1]))
    return real(*args, **{**kwargs, "impl": "xla"})

  monkeypatch.setattr(qwen2, "attention", spy)
  cfg = _model_cfg("cudnn").replace(num_hidden_layers=1)
  ids = jnp.ones((2, 6), jnp.int32)

  def generate(m):
    _, cache = m(ids, cache=m.init_cache(2, 8))
    return m(ids[:, :1], cache=cache)

  _trace(cfg, lambda m: m(ids))
  _trace(cfg, generate)
  assert calls == [("cudnn", True, 6), ("cudnn", False, 6), ("cudnn", False, 1)]


def _model_cfg(attention: str, dtype: str = "bfloat16") -> Qwen2Config:
  return Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, dtype=dtype,
                     attention=attention)


@pytest.fixture
def kernel_for_cudnn(monkeypatch):
  """Away from a GPU, 'cudnn' calls run `jax.nn.dot_product_attention(implementation='xla')`
  (the model's wiring, dtype and fallbacks unchanged); on a GPU, cuDNN itself."""
  if BACKEND != "gpu":
    monkeypatch.setattr(fused_attention, "dot_product_attention", functools.partial(
        fused_attention.dot_product_attention, implementation="xla"))
  return "cudnn" if BACKEND == "gpu" else "xla_api"


def _models(attention: str):
  """(model with `attention`, the bf16 einsum model, the fp32 einsum model): same params."""
  make = lambda cfg: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))
  return make(_model_cfg(attention)), make(_model_cfg("xla")), make(_model_cfg("xla", "float32"))


# Six compiles of a small model: ~10 s on a CPU, where the kernel-level tests above and the
# wiring test cover the same code, so it runs in the default suite only on a GPU.
@(pytest.mark.slow if BACKEND != "gpu" else pytest.mark.usefixtures())
def test_model_training_loss_grads_prefill_and_decode_match_einsum(kernel_for_cudnn, parity):
  """The bf16 model with attention='cudnn' (its kernel: see `kernel_for_cudnn`) against the
  bf16 and fp32 einsum models: logits and parameter gradients of the cache-free forward, then a
  left-padded prefill into a 12-slot cache and 2 decode steps (those run the einsum)."""
  model, ref_low, ref32 = _models("cudnn")
  rng = np.random.RandomState(0)
  ids = jnp.asarray(rng.randint(3, 128, (3, 10)))
  mask = jnp.asarray(_left_padded(3, 10, (0, 3, 7)))
  rows = np.asarray(mask)
  test = f"model[{kernel_for_cudnn}]"

  @jax.jit
  def train(graphdef, state):  # logits and parameter gradients of the cache-free forward
    def loss(state):
      logits = nnx.merge(graphdef, state)(ids, mask)
      return jnp.sum(jax.nn.log_softmax(logits)[..., 5] * mask), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(state)
    return logits, jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])

  @jax.jit
  def generate(graphdef, state):  # prefill 8 slots of a 12-slot cache, then 2 decode steps
    m = nnx.merge(graphdef, state)
    logits, cache = m(ids[:, :8], mask[:, :8], cache=m.init_cache(3, 12))
    steps = [logits[:, -1]]
    for t in range(8, 10):
      step, cache = m(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache)
      steps.append(step[:, -1])
    return logits, jnp.stack(steps, 1)

  splits = [nnx.split(m) for m in (model, ref_low, ref32)]
  (logits, grads), (logits_low, grads_low), (logits32, grads32) = (train(*s) for s in splits)
  _check(parity, test, "train_logits", jnp.bfloat16, logits, logits32, logits_low, rows)
  _check(parity, test, "param_grads", jnp.bfloat16, grads, grads32, grads_low)
  (pre, dec), (pre_low, dec_low), (pre32, dec32) = (generate(*s) for s in splits)
  _check(parity, test, "prefill_logits", jnp.bfloat16, pre, pre32, pre_low, rows[:, :8])
  _check(parity, test, "decode_logits", jnp.bfloat16, dec, dec32, dec_low)
