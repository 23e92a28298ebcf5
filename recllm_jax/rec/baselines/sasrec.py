"""SASRec (Kang & McAuley, ICDM 2018) in Flax NNX: the standard neural sequential baseline.

Published LLM recommenders (BIGRec, D3, MiniOneRec) report SASRec on the same Amazon splits, so
a SASRec trained on *our* training examples and scored by *our* harness tells whether a gap to
the published rows comes from the model or from the data and protocol.

Model: item embeddings plus learned position embeddings over a left-padded window of the newest
``max_len`` history items (so the newest item always sits at the last position), ``num_blocks``
pre-norm causal self-attention blocks with a point-wise feed-forward, and a final LayerNorm. The
last position's state is scored by dot product against every item embedding (tied weights).

Training: full softmax cross-entropy of each training example's target(s) given its history,
Adam(W) with optax, shuffled mini-batches, early stopping on NDCG@``eval_k`` of a held-out split
(the dataset's ``valid`` split, or a seeded ``valid_fraction`` of the training examples when that
is empty), keeping the best epoch's parameters. Everything is seeded, and the CPU backend is
deterministic, so the same seed gives the same rankings.

Shape letters: B batch, T window length (``max_len``), D embedding width, H heads, Dh head width,
V catalog size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from recllm_jax.data import Catalog, Example
from recllm_jax.errors import ConfigError
from recllm_jax.progress import bar as progress_bar

__all__ = ["SASRec", "SASRecConfig", "SASRecRecommender", "encode_histories"]

PAD = 0  # embedding row 0 is padding; catalog item i (catalog order) is row i + 1


@dataclasses.dataclass(frozen=True)
class SASRecConfig:
  """Model and training hyper-parameters (``sasrec.*`` in ``configs/baselines.py``)."""

  embed_dim: int = 64
  num_blocks: int = 2
  num_heads: int = 1
  dropout: float = 0.5  # SASRec's setting for the sparse Amazon datasets
  max_len: int = 20
  batch_size: int = 128
  learning_rate: float = 1e-3
  weight_decay: float = 0.0
  max_epochs: int = 200
  patience: int = 10  # epochs without a better validation NDCG before stopping
  eval_k: int = 10
  valid_fraction: float = 0.1  # only when no validation examples are given
  eval_batch_size: int = 512
  seed: int = 0

  def __post_init__(self) -> None:
    positive = ("embed_dim", "num_blocks", "num_heads", "max_len", "batch_size", "max_epochs",
                "patience", "eval_k", "eval_batch_size")
    for name in positive:
      if getattr(self, name) < 1:
        raise ConfigError(f"sasrec.{name} must be >= 1, got {getattr(self, name)}")
    if self.embed_dim % self.num_heads:
      raise ConfigError(f"sasrec.embed_dim={self.embed_dim} must be a multiple of "
                        f"sasrec.num_heads={self.num_heads}")
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"sasrec.dropout must be in [0, 1), got {self.dropout}")
    if not 0.0 < self.valid_fraction < 1.0:
      raise ConfigError(f"sasrec.valid_fraction must be in (0, 1), got {self.valid_fraction}")
    if self.learning_rate <= 0.0 or self.weight_decay < 0.0:
      raise ConfigError(f"sasrec.learning_rate must be > 0 and weight_decay >= 0, got "
                        f"{self.learning_rate} and {self.weight_decay}")


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


class _Block(nnx.Module):
  """Pre-norm causal self-attention + point-wise feed-forward, each with a residual."""

  def __init__(self, cfg: SASRecConfig, rngs: nnx.Rngs) -> None:
    d = cfg.embed_dim
    self.num_heads, self.dropout = cfg.num_heads, cfg.dropout
    self.attn_norm = nnx.LayerNorm(d, epsilon=1e-8, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
    self.out = nnx.Linear(d, d, rngs=rngs)
    self.ffn_norm = nnx.LayerNorm(d, epsilon=1e-8, rngs=rngs)
    self.ffn_in = nnx.Linear(d, d, rngs=rngs)
    self.ffn_out = nnx.Linear(d, d, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array, keys: list[jax.Array] | None) -> jax.Array:
    b, t, d = x.shape
    key = (lambda: keys.pop()) if keys is not None else (lambda: None)
    q, k, v = jnp.split(self.qkv(self.attn_norm(x)), 3, axis=-1)  # 3 x [B, T, D]
    heads = lambda a: a.reshape(b, t, self.num_heads, d // self.num_heads)  # [B, T, H, Dh]
    logits = jnp.einsum("bqhd,bkhd->bhqk", heads(q), heads(k)) / math.sqrt(d // self.num_heads)
    # A fully masked (padding) query row gets uniform weights instead of NaN; it is never read.
    logits = jnp.where(mask[:, None], logits, jnp.finfo(logits.dtype).min)  # [B, H, T, T]
    weights = _dropout(jax.nn.softmax(logits, axis=-1), self.dropout, key())
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, heads(v)).reshape(b, t, d)  # [B, T, D]
    x = x + _dropout(self.out(attended), self.dropout, key())
    hidden = _dropout(jax.nn.relu(self.ffn_in(self.ffn_norm(x))), self.dropout, key())
    return x + _dropout(self.ffn_out(hidden), self.dropout, key())


class SASRec(nnx.Module):
  """Maps left-padded item-index windows ``[B, T]`` to scores over the catalog ``[B, V]``."""

  def __init__(self, num_items: int, cfg: SASRecConfig, *, rngs: nnx.Rngs) -> None:
    # Only what the forward pass reads: the GraphDef keys the compiled-step caches, so training
    # settings (epochs, batch size ...) must not make two equal architectures look different.
    self.max_len, self.embed_dim, self.dropout = cfg.max_len, cfg.embed_dim, cfg.dropout
    self.item_embed = nnx.Embed(num_items + 1, cfg.embed_dim, rngs=rngs)  # row 0 = PAD
    self.pos_embed = nnx.Embed(cfg.max_len, cfg.embed_dim, rngs=rngs)
    self.blocks = nnx.List([_Block(cfg, rngs) for _ in range(cfg.num_blocks)])
    self.final_norm = nnx.LayerNorm(cfg.embed_dim, epsilon=1e-8, rngs=rngs)

  def __call__(self, seq: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """Catalog scores from the last position; ``dropout_key=None`` is inference mode."""
    t = seq.shape[1]
    real = seq != PAD  # [B, T]
    x = self.item_embed(seq) * math.sqrt(self.embed_dim) + self.pos_embed(jnp.arange(t))[None]
    keys = None
    if dropout_key is not None:
      keys = list(jax.random.split(dropout_key, 1 + 4 * len(self.blocks)))
    x = _dropout(x, self.dropout, None if keys is None else keys.pop()) * real[..., None]  # [B, T, D]
    causal = jnp.tril(jnp.ones((t, t), bool))  # [T, T]
    mask = causal[None] & real[:, None, :]  # [B, T(query), T(key)]
    for block in self.blocks:
      x = block(x, mask, keys) * real[..., None]  # padding stays zero, as in SASRec
    last = self.final_norm(x[:, -1])  # [B, D]
    return last @ self.item_embed.embedding[1:].T  # [B, V]


def encode_histories(examples: Sequence[Example], index: dict[str, int], max_len: int) -> np.ndarray:
  """Left-padded embedding rows of the newest ``max_len`` history items: ``[N, max_len]`` int32."""
  out = np.full((len(examples), max_len), PAD, np.int32)
  for row, ex in enumerate(examples):
    ids = [index[i] for i in ex.history[-max_len:]]
    if ids:
      out[row, max_len - len(ids):] = ids
  return out


def _flatten_targets(examples: Sequence[Example], index: dict[str, int], max_len: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """One (history window, target row) pair per target: ``[N', T]`` and ``[N']``."""
  rows = [r for r, ex in enumerate(examples) for _ in ex.targets]
  targets = np.array([index[t] for ex in examples for t in ex.targets], np.int32)
  return encode_histories(examples, index, max_len)[rows], targets


def _split_validation(train: Sequence[Example], cfg: SASRecConfig
                      ) -> tuple[list[Example], list[Example]]:
  rng = np.random.default_rng(cfg.seed)
  held = rng.random(len(train)) < cfg.valid_fraction
  return ([ex for ex, h in zip(train, held) if not h], [ex for ex, h in zip(train, held) if h])


@dataclasses.dataclass
class SASRecRecommender:
  """A trained SASRec and the catalog order its scores follow."""

  model: SASRec
  item_ids: tuple[str, ...]  # score column j is item_ids[j]
  history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # per-epoch log
  best_epoch: int = 0

  @property
  def index(self) -> dict[str, int]:
    return {item_id: j + 1 for j, item_id in enumerate(self.item_ids)}

  @classmethod
  def fit(cls, train: Sequence[Example], catalog: Catalog, cfg: SASRecConfig = SASRecConfig(), *,
          valid: Sequence[Example] | None = None, progress: bool = False) -> SASRecRecommender:
    """Train on ``train``, early-stopping on ``valid`` (or a held-out part of ``train``)."""
    if not train:
      raise ValueError("SASRec needs at least one training example")
    if not valid:
      train, valid = _split_validation(train, cfg)
      if not valid or not train:
        raise ValueError(f"too few training examples ({len(train) + len(valid)}) to hold out "
                         f"sasrec.valid_fraction={cfg.valid_fraction} for early stopping")
    item_ids = tuple(item.item_id for item in catalog)
    index = {item_id: j + 1 for j, item_id in enumerate(item_ids)}
    seqs, targets = _flatten_targets(train, index, cfg.max_len)
    valid_seqs, valid_targets = _flatten_targets(valid, index, cfg.max_len)

    model = SASRec(len(item_ids), cfg, rngs=nnx.Rngs(params=cfg.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    tx, train_step = _make_train_step(graphdef, cfg.learning_rate, cfg.weight_decay, cfg.dropout)
    opt_state = tx.init(params)
    eval_step = _make_eval_step(graphdef, cfg.eval_k)

    batch = min(cfg.batch_size, len(targets))
    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    best = (-1.0, 0, params)  # (valid NDCG, epoch, params)
    log: list[dict[str, float]] = []
    bar = progress_bar(range(1, cfg.max_epochs + 1), desc="sasrec", unit="epoch",
                       disable=not progress)
    for epoch in bar:
      order = rng.permutation(len(targets))
      losses = []
      # Full batches only (one compiled shape); the shuffle rotates the dropped remainder.
      for start in range(0, len(order) - batch + 1, batch):
        rows = order[start:start + batch]
        key, step_key = jax.random.split(key)
        params, opt_state, loss = train_step(params, opt_state, seqs[rows], targets[rows], step_key)
        losses.append(loss)
      ndcg = _evaluate(eval_step, params, valid_seqs, valid_targets, cfg.eval_batch_size)
      loss = float(np.mean(jax.device_get(losses)))
      log.append({"epoch": epoch, "loss": loss, f"valid_ndcg@{cfg.eval_k}": ndcg})
      if ndcg > best[0]:
        best = (ndcg, epoch, jax.tree.map(jnp.copy, params))  # params buffers are donated next step
      bar.set_postfix(loss=f"{loss:.3f}", ndcg=f"{ndcg:.4f}", best=best[1])
      if epoch - best[1] >= cfg.patience:
        break
    bar.close()
    return cls(model=nnx.merge(graphdef, best[2]), item_ids=item_ids, history=log, best_epoch=best[1])

  def param_arrays(self) -> dict[str, np.ndarray]:
    """The trained parameters as ``{path: array}`` (``jax.tree_util.keystr`` paths), the form
    `from_param_arrays` rebuilds from, so that a fit can be saved (``np.savez``) and reused."""
    _, params = nnx.split(self.model, nnx.Param)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}

  @classmethod
  def from_param_arrays(cls, arrays: Mapping[str, np.ndarray], item_ids: Sequence[str],
                        cfg: SASRecConfig, *, history: list[dict[str, float]] | None = None,
                        best_epoch: int = 0) -> SASRecRecommender:
    """A recommender from `param_arrays` of a fit with the same ``cfg`` and catalog order.

    Raises ValueError when a parameter is missing, extra or of another shape (a fit of another
    architecture or catalog): loading it anyway would score other items than it claims.
    """
    model = SASRec(len(item_ids), cfg, rngs=nnx.Rngs(params=cfg.seed))
    graphdef, template = nnx.split(model, nnx.Param)
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [jax.tree_util.keystr(path) for path, _ in flat]
    if set(names) != set(arrays):
      raise ValueError(f"SASRec parameters do not match the architecture: missing "
                       f"{sorted(set(names) - set(arrays))}, unexpected {sorted(set(arrays) - set(names))}")
    leaves = []
    for name, (_, want) in zip(names, flat):
      got = np.asarray(arrays[name])
      if got.shape != want.shape:
        raise ValueError(f"SASRec parameter {name} has shape {got.shape}, expected {want.shape}")
      leaves.append(jnp.asarray(got, want.dtype))
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    return cls(model=nnx.merge(graphdef, params), item_ids=tuple(item_ids),
               history=list(history or []), best_epoch=best_epoch)

  def scores(self, examples: Sequence[Example], batch_size: int = 512) -> np.ndarray:
    """Catalog scores ``[N, V]`` (column ``j`` is ``item_ids[j]``)."""
    seqs = encode_histories(examples, self.index, self.model.max_len)
    graphdef, params = nnx.split(self.model, nnx.Param)
    score = _make_score(graphdef)
    chunks = []
    for start in range(0, len(seqs), batch_size):
      rows = seqs[start:start + batch_size]
      chunks.append(np.asarray(score(params, _padded(rows, batch_size)))[:len(rows)])  # [n, V]
    return np.concatenate(chunks)

  def recommend(self, examples: Sequence[Example], k: int, batch_size: int = 512) -> list[list[str]]:
    """Top-``k`` ids per example over the full catalog, best first (ties: catalog order)."""
    k = min(k, len(self.item_ids))
    scores = self.scores(examples, batch_size)  # [N, V]
    # A stable sort on -score keeps ties in catalog order, so rankings are reproducible.
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [N, k]
    return [[self.item_ids[j] for j in row] for row in top]


def _padded(seqs: np.ndarray, size: int) -> np.ndarray:
  """Pads a final short batch with PAD rows so every call has one compiled shape."""
  if len(seqs) == size:
    return seqs
  return np.concatenate([seqs, np.full((size - len(seqs), seqs.shape[1]), PAD, seqs.dtype)])


# The step builders are cached on their static inputs (a GraphDef is hashable and equal for equal
# architectures), so refitting the same architecture, as tests and sweeps do, skips recompiling.


@functools.lru_cache(maxsize=8)
def _make_score(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
  return jax.jit(lambda params, seqs: nnx.merge(graphdef, params)(seqs))  # [B, V]


@functools.lru_cache(maxsize=8)
def _make_train_step(graphdef: nnx.GraphDef, learning_rate: float, weight_decay: float,
                     dropout: float) -> tuple[optax.GradientTransformation, Callable[..., Any]]:
  tx = optax.adamw(learning_rate, weight_decay=weight_decay)

  def loss_fn(params, seqs, targets, key):
    logits = nnx.merge(graphdef, params)(seqs, dropout_key=key if dropout > 0 else None)  # [B, V]
    # Embedding row r is score column r - 1.
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets - 1).mean()

  def step(params, opt_state, seqs, targets, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, seqs, targets, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def _make_eval_step(graphdef: nnx.GraphDef, k: int) -> Callable[..., jax.Array]:
  def step(params, seqs, targets):
    scores = nnx.merge(graphdef, params)(seqs)  # [B, V]
    target_score = jnp.take_along_axis(scores, targets[:, None] - 1, axis=1)  # [B, 1]
    rank = (scores > target_score).sum(axis=1)  # [B], 0-based; ties counted in the target's favour
    return jnp.where(rank < k, 1.0 / jnp.log2(rank + 2.0), 0.0)  # [B]

  return jax.jit(step)


def _evaluate(eval_step, params, seqs: np.ndarray, targets: np.ndarray, batch_size: int) -> float:
  """Mean NDCG@k over ``(seqs, targets)`` (single-target form; each target is its own row)."""
  total = 0.0
  for i in range(0, len(targets), batch_size):
    n = len(targets[i:i + batch_size])
    padded_targets = np.concatenate([targets[i:i + n], np.ones(batch_size - n, np.int32)])
    gains = eval_step(params, _padded(seqs[i:i + n], batch_size), padded_targets)
    total += float(np.asarray(gains)[:n].sum())
  return total / len(targets)
