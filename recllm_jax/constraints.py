"""Catalog-constrained decoding: a token-level prefix trie compiled into dense arrays.

An LLM recommender names items by title, so an unconstrained decoder can invent titles that are
not in the catalog. `CatalogConstraint` restricts decoding to token sequences of catalog items:
at every step it produces an allowed-token mask `[B, V]` inside `jit`, from a small per-row
`ConstraintState` carried through the decode loop (see `recllm_jax.decoding`).

Trie layout (built once on the host, `ItemTrie`):

* Nodes are numbered in BFS order with siblings sorted by token, so the children of node `n` are
  the contiguous node ids `[first_child[n], first_child[n + 1])` and `token[c]` is the edge label
  of child `c`. A child lookup is a binary search over that segment; there is no dense
  `[nodes, vocab]` table (100k items x 30 tokens x 150k vocab would be ~450 G entries).
* Distinct titles ("leaves") are numbered in DFS (pre-order, token-sorted) order, so the leaves
  below node `n` are exactly `[leaf_lo[n], leaf_hi[n])`, and a node where a title ends owns
  leaf `leaf_lo[n]`. This makes "is every item below this child already used?" two binary
  searches against the row's sorted list of banned leaves, which is how repeats and
  history items are excluded without dead ends (a prefix whose items are all banned is masked).
* Nodes with many children (the root, popular brand prefixes) would make a per-row scatter of
  their children expensive, so nodes with more than `max_sparse_degree` children also keep a
  bit-packed mask row `[ceil(V / 32)] uint32`; all other nodes scatter at most
  `max_sparse_degree` children.

Titles are not unique in real catalogs: items with the same token sequence share one leaf
(`ItemTrie.leaf_items(leaf)` lists their item indices). Repeat and history exclusion work on
leaves, i.e. a title is used once even if several item ids carry it.

Lists of items: with `num_items=K`, the decoder emits K distinct items separated by the
`delimiter` token sequence, the K-th item followed by `eos_token_id`; the trie restarts after each
delimiter. Token ids are matched exactly, so a delimiter must be tokenised the way the model is
trained to emit it, and an end token (delimiter[0] or EOS) must not also continue a title that
ends at the same node (checked at build time).

Triggered lists (`TriggerSpec`, the `cot_constrained` rollout): a row reasons freely until its
generated tokens end with a trigger sequence (e.g. the ids of "<answer>\n"); only then does the
trie take over, and the list is followed by a forced close sequence (e.g. "\n</answer>") and EOS.
The free prefix is matched on device with a KMP automaton over the (short, static) trigger, so
each row switches on its own step inside the same jitted loop.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ItemTrie", "TrieArrays", "PriorArrays", "CatalogConstraint", "ConstraintSpec",
           "ConstraintState", "init_state", "allowed_tokens", "advance", "TriggerSpec", "TriggerState",
           "check_trigger", "trigger_init", "trigger_allowed", "trigger_advance", "trigger_active"]


# ----------------------------------------------------------------------------------------------
# Host-side trie
# ----------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrieArrays:
  """The device half of an `ItemTrie` (a pytree; passed to jitted code as an argument)."""

  first_child: jax.Array  # [N + 1] int32, children of n are node ids [first_child[n], first_child[n+1])
  token: jax.Array  # [N] int32, label of the edge into each node (root: -1)
  leaf_lo: jax.Array  # [N] int32, leaves below n are [leaf_lo[n], leaf_hi[n])
  leaf_hi: jax.Array  # [N] int32
  terminal: jax.Array  # [N] bool, a title ends here (its leaf is leaf_lo[n])
  dense_nodes: jax.Array  # [Nd] int32 sorted ids of high-degree nodes
  dense_bits: jax.Array  # [Nd + 1, ceil(V/32)] uint32 bit-packed child masks; last row all 0
  item_leaf: jax.Array  # [I] int32 leaf of each catalog item
  num_leaves: int = flax.struct.field(pytree_node=False)
  vocab_size: int = flax.struct.field(pytree_node=False)
  max_sparse_degree: int = flax.struct.field(pytree_node=False)
  search_steps: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class PriorArrays:
  """What a per-row prior over leaves needs beyond `TrieArrays` (`ItemTrie.prior_arrays`).

  Every (node, leaf below it) pair, so that node masses are sums of positive leaf masses (a
  scatter-add) rather than differences of a cumulative sum, which lose the small masses of
  tail items to float32 cancellation.
  """

  pair_node: jax.Array  # [P] int32 node of each pair, P = sum over leaves of (length + 1)
  pair_leaf: jax.Array  # [P] int32 leaf of each pair
  max_degree: int = flax.struct.field(pytree_node=False)  # most children of any node


class ItemTrie:
  """Prefix trie over item token sequences, compiled to flat numpy arrays.

  Build with `ItemTrie(sequences, vocab_size)`, `ItemTrie.from_titles(titles, tokenizer)` or
  `ItemTrie.from_catalog(catalog, tokenizer)`; `item` i of the catalog is `sequences[i]`.
  """

  def __init__(self, sequences: Sequence[Sequence[int]], vocab_size: int, *,
               max_sparse_degree: int = 64):
    if not sequences:
      raise ValueError("an ItemTrie needs at least one item")
    seqs = [tuple(int(t) for t in s) for s in sequences]
    for i, s in enumerate(seqs):
      if not s:
        raise ValueError(f"item {i} has an empty token sequence")
      if min(s) < 0 or max(s) >= vocab_size:
        raise ValueError(f"item {i} has token ids outside [0, {vocab_size})")
    self.vocab_size = int(vocab_size)
    self.max_sparse_degree = int(max_sparse_degree)
    self.num_items = len(seqs)
    self.item_ids: tuple[str, ...] | None = None  # catalog ids of the items (`from_catalog`)

    # Distinct sequences = leaves, in lexicographic (DFS pre-order) order: a prefix sorts first.
    unique = sorted(set(seqs))
    leaf_of = {s: i for i, s in enumerate(unique)}
    self.item_leaf = np.array([leaf_of[s] for s in seqs], np.int32)  # [I]
    order = np.argsort(self.item_leaf, kind="stable")
    self.leaf_item_ids = order.astype(np.int32)  # [I] items grouped by leaf
    self.leaf_item_start = np.searchsorted(self.item_leaf[order], np.arange(len(unique) + 1))
    self.leaf_sequences = unique
    self.num_leaves = len(unique)
    self._build(unique)

  def _build(self, unique: list[tuple[int, ...]]) -> None:
    # Sorted sequences make each trie node a contiguous run [lo, hi) of leaves sharing its prefix.
    # With lcp[i] = longest common prefix of sequences i-1 and i, leaf i starts a depth-D node
    # iff len(i) >= D and lcp[i] < D, and that node ends at the next j with lcp[j] < D. Building
    # one depth at a time (BFS) keeps this vectorised: 100k titles x 30 tokens take ~1 s.
    num_leaves = len(unique)
    lengths = np.array([len(s) for s in unique], np.int64)  # [L]
    max_len = int(lengths.max())
    table = np.full((num_leaves, max_len), -1, np.int64)  # [L, maxlen], -1 past the end
    for i, s in enumerate(unique):
      table[i, :len(s)] = s
    same = (table[1:] == table[:-1]) & (table[1:] >= 0)  # [L-1, maxlen]
    lcp = np.concatenate([[0], np.cumprod(same, axis=1).sum(1)])  # [L]

    first_child = [np.zeros(1, np.int64)]  # per depth: first child id of each node
    tokens, lo_all, hi_all, term_all = [np.array([-1])], [np.array([0])], [np.array([num_leaves])], []
    term_all.append(np.array([lengths[0] == 0]))
    prev_lo = np.array([0])
    offset = 1  # id of the first node at the next depth
    for depth in range(1, max_len + 1):
      starts = np.flatnonzero((lengths >= depth) & (lcp < depth))  # [Nd] leaf_lo of depth nodes
      boundaries = np.flatnonzero(lcp < depth)
      nxt = np.searchsorted(boundaries, starts, side="right")
      ends = np.where(nxt < len(boundaries), boundaries[np.minimum(nxt, len(boundaries) - 1)],
                      num_leaves)
      parent_rank = np.searchsorted(prev_lo, starts, side="right") - 1  # among depth-1 nodes
      per_parent = np.bincount(parent_rank, minlength=len(prev_lo))
      first_child[-1] = offset + np.concatenate([[0], np.cumsum(per_parent)[:-1]])
      tokens.append(table[starts, depth - 1])
      lo_all.append(starts)
      hi_all.append(ends)
      term_all.append(lengths[starts] == depth)
      first_child.append(np.zeros(len(starts), np.int64))
      offset += len(starts)
      prev_lo = starts
    first_child[-1] = np.full(len(prev_lo), offset)
    self.first_child = np.concatenate(first_child + [[offset]]).astype(np.int32)  # [N + 1]
    self.token = np.concatenate(tokens).astype(np.int32)  # [N]
    self.leaf_lo = np.concatenate(lo_all).astype(np.int32)  # [N]
    self.leaf_hi = np.concatenate(hi_all).astype(np.int32)  # [N]
    self.terminal = np.concatenate(term_all).astype(bool)  # [N]
    self.num_nodes = int(offset)
    degree = np.diff(self.first_child)  # [N]
    self.max_degree = int(degree.max())
    self.dense_nodes = np.flatnonzero(degree > self.max_sparse_degree).astype(np.int32)  # [Nd]
    words = math.ceil(self.vocab_size / 32)
    bits = np.zeros((len(self.dense_nodes), words), np.uint32)
    for row, n in enumerate(self.dense_nodes):
      child_tokens = self.token[self.first_child[n]:self.first_child[n + 1]].astype(np.int64)
      np.bitwise_or.at(bits[row], child_tokens // 32,
                       (np.uint32(1) << (child_tokens % 32).astype(np.uint32)))
    self.dense_bits = np.concatenate([bits, np.zeros((1, words), np.uint32)])  # [Nd + 1, W]

  @classmethod
  def from_titles(cls, titles: Sequence[str], tokenizer: Any, *, vocab_size: int | None = None,
                  **kwargs: Any) -> "ItemTrie":
    """Tokenises titles without special tokens (an HF tokenizer or a `tokenizers.Tokenizer`).

    `vocab_size` must be the model's vocabulary (logit columns), which may exceed the
    tokenizer's; it defaults to `len(tokenizer)`.
    """
    seqs = []
    for t in titles:
      if hasattr(tokenizer, "encode") and hasattr(tokenizer, "get_vocab_size"):  # tokenizers
        seqs.append(tokenizer.encode(t, add_special_tokens=False).ids)
      else:
        seqs.append(tokenizer.encode(t, add_special_tokens=False))
    if vocab_size is None:
      vocab_size = (tokenizer.get_vocab_size() if hasattr(tokenizer, "get_vocab_size")
                    else len(tokenizer))
    return cls(seqs, vocab_size, **kwargs)

  @classmethod
  def from_codec(cls, codec: Any, tokenizer: Any, *, vocab_size: int | None = None,
                 **kwargs: Any) -> "ItemTrie":
    """The trie of every item of a `recllm_jax.data.items.ItemCodec`, item i = the catalog's
    i-th item, each spelled as the codec writes it (its title, or its semantic ID's tokens).

    Every item is included, so item indices are catalog positions and items with the same
    text (titles shared by several items; never SIDs) share a leaf (`catalog_ids(leaf)` lists
    all of them): leaves and item ids cannot drift apart.
    """
    trie = cls.from_titles(codec.texts(), tokenizer, vocab_size=vocab_size, **kwargs)
    trie.item_ids = tuple(item.item_id for item in codec.catalog)
    return trie

  @classmethod
  def from_catalog(cls, catalog: Any, tokenizer: Any, *, vocab_size: int | None = None,
                   **kwargs: Any) -> "ItemTrie":
    """`from_codec` of a `Catalog` (its titles) or of an `ItemCodec`.

    Unlike `from_titles(catalog.titles())`, which keeps one item per title, every item is
    included (see `from_codec`).
    """
    from recllm_jax.data.items import as_codec

    return cls.from_codec(as_codec(catalog), tokenizer, vocab_size=vocab_size, **kwargs)

  # -- host utilities ----------------------------------------------------------------------

  def catalog_ids(self, leaf: int) -> list[str]:
    """Catalog item ids of leaf `leaf`, in catalog order (a trie built by `from_catalog`)."""
    if self.item_ids is None:
      raise ValueError("this ItemTrie was not built by ItemTrie.from_catalog: it has no item ids")
    return [self.item_ids[i] for i in self.leaf_items(leaf)]

  def leaf_items(self, leaf: int) -> list[int]:
    """Item indices whose token sequence is leaf `leaf` (duplicates share a leaf)."""
    a, b = self.leaf_item_start[leaf], self.leaf_item_start[leaf + 1]
    return self.leaf_item_ids[a:b].tolist()

  def lookup(self, tokens: Sequence[int]) -> int:
    """Leaf id of an exact token sequence, or -1."""
    node = 0
    for t in tokens:
      a, b = self.first_child[node], self.first_child[node + 1]
      i = a + int(np.searchsorted(self.token[a:b], t))
      if i >= b or self.token[i] != t:
        return -1
      node = i
    return int(self.leaf_lo[node]) if self.terminal[node] else -1

  def check_end_tokens(self, end_tokens: Sequence[int]) -> None:
    """Raises if an end token also continues a title at a node where another title ends."""
    ends = np.array(sorted(set(int(t) for t in end_tokens)), np.int32)
    parent = np.repeat(np.arange(self.num_nodes), np.diff(self.first_child))  # [N - 1]
    clash = np.flatnonzero(self.terminal[parent] & np.isin(self.token[1:], ends))
    if clash.size:
      n = parent[clash[0]]
      raise ValueError(
          f"end token {int(self.token[clash[0] + 1])} continues a title after the complete "
          f"title {list(self.leaf_sequences[self.leaf_lo[n]])}: choose a delimiter/EOS that "
          "never occurs inside titles")

  def leaf_log_prior(self, item_log_prior: Any) -> np.ndarray:
    """[B, I] per-item log-probabilities (catalog order) -> [B, L] per-leaf log masses.

    Items sharing a title share a leaf, so a leaf's mass is the sum of its items' masses
    (log-sum-exp, in float64 so that tiny masses survive); -inf items add nothing.
    """
    logp = np.asarray(item_log_prior, np.float64)
    if logp.ndim != 2 or logp.shape[1] != self.num_items:
      raise ValueError(f"item log-prior must be [B, num_items={self.num_items}], got {logp.shape}")
    top = np.max(logp, axis=1, keepdims=True)  # [B, 1]
    top = np.where(np.isfinite(top), top, 0.0)
    mass = np.zeros((logp.shape[0], self.num_leaves), np.float64)  # [B, L]
    np.add.at(mass.T, self.item_leaf, np.exp(logp - top).T)
    with np.errstate(divide="ignore"):
      return (np.log(mass) + top).astype(np.float32)

  def prior_arrays(self) -> "PriorArrays":
    """Device arrays that turn a per-leaf prior into per-node masses (`PriorArrays`), cached."""
    if not hasattr(self, "_prior"):
      # Node n's leaves are the contiguous range [leaf_lo[n], leaf_hi[n]) (DFS leaf order), so
      # its (node, leaf) pairs are one arange per node: sum(len(title) + 1) pairs in all.
      width = (self.leaf_hi - self.leaf_lo).astype(np.int64)  # [N]
      pair_node = np.repeat(np.arange(self.num_nodes, dtype=np.int64), width)  # [P]
      starts = np.concatenate([[0], np.cumsum(width)[:-1]])  # [N] first pair of each node
      pair_leaf = np.arange(pair_node.size) - np.repeat(starts - self.leaf_lo, width)  # [P]
      self._prior = PriorArrays(pair_node=jnp.asarray(pair_node, jnp.int32),
                                pair_leaf=jnp.asarray(pair_leaf, jnp.int32),
                                max_degree=self.max_degree)
    return self._prior

  @property
  def nbytes(self) -> int:
    """Bytes of the device arrays."""
    return sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(self._numpy_arrays()))

  def _numpy_arrays(self) -> dict[str, np.ndarray]:
    return dict(first_child=self.first_child, token=self.token, leaf_lo=self.leaf_lo,
                leaf_hi=self.leaf_hi, terminal=self.terminal, dense_nodes=self.dense_nodes,
                dense_bits=self.dense_bits, item_leaf=self.item_leaf)

  def device_arrays(self) -> TrieArrays:
    """The arrays on the default device (replicated under a mesh: they are read by gathers)."""
    if not hasattr(self, "_device"):
      arrays = {k: jnp.asarray(v) for k, v in self._numpy_arrays().items()}
      self._device = TrieArrays(
          **arrays, num_leaves=self.num_leaves, vocab_size=self.vocab_size,
          max_sparse_degree=min(self.max_sparse_degree, self.max_degree),
          search_steps=max(1, math.ceil(math.log2(self.max_degree + 1))) + 1)
    return self._device


# ----------------------------------------------------------------------------------------------
# The constraint object handed to `generate` / `beam_search`
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConstraintSpec:
  """Static (hashable) part of a constraint: it shapes the compiled program."""

  num_items: int
  delimiter: tuple[int, ...]
  eos_token_id: int
  has_history: bool


@dataclasses.dataclass(frozen=True, eq=False)
class CatalogConstraint:
  """Decode exactly `num_items` distinct catalog items.

  Attributes:
    trie: the catalog's `ItemTrie`.
    eos_token_id: token that ends the last item (and generation).
    num_items: K, items per output; items 1..K-1 are followed by `delimiter`.
    delimiter: token ids separating items (required when K > 1).
    history: optional `[B, H]` item indices per prompt (padded with -1) that may not be emitted,
      e.g. the user's interaction history. Rows follow the prompts (before `num_samples`).
  """

  trie: ItemTrie
  eos_token_id: int
  num_items: int = 1
  delimiter: tuple[int, ...] = ()
  history: Any = None

  def __post_init__(self):
    object.__setattr__(self, "delimiter", tuple(int(t) for t in self.delimiter))
    if self.num_items < 1:
      raise ValueError(f"num_items must be >= 1, got {self.num_items}")
    if self.num_items > 1 and not self.delimiter:
      raise ValueError("a delimiter is needed to decode more than one item")
    ends = [self.eos_token_id] + ([self.delimiter[0]] if self.num_items > 1 else [])
    self.trie.check_end_tokens(ends)

  def with_history(self, history: Any) -> "CatalogConstraint":
    return dataclasses.replace(self, history=history)

  @property
  def spec(self) -> ConstraintSpec:
    return ConstraintSpec(self.num_items, self.delimiter, int(self.eos_token_id),
                          self.history is not None)

  def items(self, leaves: Any) -> list[list[list[int]]]:
    """Host: leaf ids `[B, K]` (e.g. `GenerateOutput.items`) -> per row, per slot, item ids."""
    leaves = np.asarray(leaves)
    return [[self.trie.leaf_items(int(l)) if l >= 0 else [] for l in row] for row in leaves]


@flax.struct.dataclass
class ConstraintState:
  """Per-row decoding state; every field has the batch as its leading axis."""

  node: jax.Array  # [B] int32 current trie node (0 = root)
  delim_pos: jax.Array  # [B] int32 next delimiter token to emit, -1 inside an item
  count: jax.Array  # [B] int32 items completed
  items: jax.Array  # [B, K] int32 leaf ids in emission order, -1 = not yet
  banned: jax.Array  # [B, H + K] int32 sorted unique leaf ids that may not be emitted (+ sentinels)


# ----------------------------------------------------------------------------------------------
# Jittable pieces
# ----------------------------------------------------------------------------------------------


def _segment_search(keys: jax.Array, lo: jax.Array, hi: jax.Array, target: jax.Array,
                    steps: int) -> jax.Array:
  """Last index i in [lo, hi) with keys[i] <= target (lo - 1 if none); keys sorted per segment.

  Elementwise over any broadcastable shape of lo/hi/target, `steps` >= log2(max segment + 1).
  """
  lo, hi, target = jnp.broadcast_arrays(lo, hi, target)

  def body(_, bounds):
    l, h = bounds
    mid = (l + h) // 2
    right = keys[jnp.clip(mid, 0, keys.shape[0] - 1)] <= target
    active = l < h
    return jnp.where(active & right, mid + 1, l), jnp.where(active & ~right, mid, h)

  first_greater, _ = jax.lax.fori_loop(0, steps, body, (lo, hi))
  return first_greater - 1


def _count_in_range(sorted_rows: jax.Array, lo: jax.Array, hi: jax.Array) -> jax.Array:
  """Per row, how many entries of sorted_rows [B, M] lie in [lo, hi) (lo/hi: [B, Q])."""
  search = jax.vmap(jnp.searchsorted)
  return search(sorted_rows, hi) - search(sorted_rows, lo)


def init_state(trie: TrieArrays, spec: ConstraintSpec, batch: int,
               history: jax.Array | None = None) -> ConstraintState:
  """Start-of-generation state. history: [B, H] item indices (-1 padded) that are banned."""
  sentinel = trie.num_leaves  # sorts after every real leaf
  free = jnp.full((batch, spec.num_items), sentinel, jnp.int32)
  if history is None:
    banned = free
  else:
    leaves = jnp.where(history >= 0, trie.item_leaf[jnp.maximum(history, 0)], sentinel)
    leaves = jnp.sort(leaves.astype(jnp.int32), axis=-1)  # [B, H]
    dup = jnp.concatenate([jnp.zeros((batch, 1), bool), leaves[:, 1:] == leaves[:, :-1]], -1)
    leaves = jnp.sort(jnp.where(dup, sentinel, leaves), axis=-1)
    banned = jnp.concatenate([leaves, free], axis=-1)  # [B, H + K], sentinels last
  return ConstraintState(
      node=jnp.zeros((batch,), jnp.int32), delim_pos=jnp.full((batch,), -1, jnp.int32),
      count=jnp.zeros((batch,), jnp.int32),
      items=jnp.full((batch, spec.num_items), -1, jnp.int32), banned=banned)


def _end_token(spec: ConstraintSpec, count: jax.Array) -> jax.Array:
  """[B] token that completes the current item: delimiter[0], or EOS for the K-th item."""
  if spec.num_items == 1:
    return jnp.full_like(count, spec.eos_token_id)
  return jnp.where(count + 1 < spec.num_items, spec.delimiter[0], spec.eos_token_id)


def _exhausted_children(trie: TrieArrays, node: jax.Array,
                        banned: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Children of `node` [B] all of whose leaves are banned.

  Returns their tokens [B, M] (one per banned leaf below the node, V where none) and their
  number [B] (distinct children).
  """
  node_b = node[:, None]  # [B, 1]
  own = trie.terminal[node_b].astype(jnp.int32)
  below = (banned >= trie.leaf_lo[node_b] + own) & (banned < trie.leaf_hi[node_b])  # [B, M]
  child = _segment_search(trie.leaf_lo, trie.first_child[node_b], trie.first_child[node_b + 1],
                          banned, trie.search_steps)  # [B, M] child holding each banned leaf
  child = jnp.clip(child, 0, trie.token.shape[0] - 1)
  lo, hi = trie.leaf_lo[child], trie.leaf_hi[child]  # [B, M]
  exhausted = below & (_count_in_range(banned, lo, hi) == hi - lo)  # [B, M]
  # `banned` is sorted, so entries under one child are adjacent: count each child once.
  first = jnp.concatenate([exhausted[:, :1], exhausted[:, 1:] & (
      ~exhausted[:, :-1] | (child[:, 1:] != child[:, :-1]))], axis=-1)
  return jnp.where(exhausted, trie.token[child], trie.vocab_size), first.sum(-1)


def _unpack_bits(words: jax.Array, vocab: int) -> jax.Array:
  """[B, W] uint32 -> [B, V] bool (bit j of word w is token 32 w + j)."""
  bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1  # [B, W, 32]
  return bits.reshape(words.shape[0], -1)[:, :vocab].astype(bool)


def allowed_tokens(trie: TrieArrays, spec: ConstraintSpec, state: ConstraintState) -> jax.Array:
  """[B, V] bool: tokens that keep every row on a path to a new, non-banned catalog item.

  Everything is decided on per-row scalars and [B, M] / [B, D] index arrays first; the [B, V]
  mask is then materialised once (the dense row of a high-degree node, else zeros) and edited
  with scatters, so the per-step cost is one pass over [B, V] even for a 150k vocabulary.
  """
  batch, vocab = state.node.shape[0], trie.vocab_size
  rows = jnp.arange(batch)[:, None]
  node = state.node
  start, stop = trie.first_child[node], trie.first_child[node + 1]  # [B]
  exhausted_tok, n_exhausted = _exhausted_children(trie, node, state.banned)
  own_banned = jnp.any(state.banned == trie.leaf_lo[node][:, None], axis=-1)  # [B]
  end_ok = trie.terminal[node] & ~own_banned  # the current node completes a usable title
  live = stop - start - n_exhausted + end_ok.astype(jnp.int32)  # [B] allowed tokens in a title

  # Rows with exactly one legal token: inside a delimiter, finished (EOS), or (defensively) stuck.
  in_delim = state.delim_pos >= 0
  finished = state.count >= spec.num_items
  forced = in_delim | finished | (live == 0)  # [B]
  forced_tok = jnp.full_like(node, spec.eos_token_id)
  if spec.delimiter:
    delim = jnp.asarray(spec.delimiter, jnp.int32)
    want = delim[jnp.clip(state.delim_pos, 0, len(spec.delimiter) - 1)]
    forced_tok = jnp.where(in_delim & ~finished, want, forced_tok)

  n_dense = trie.dense_nodes.shape[0]
  if n_dense:
    d = jnp.clip(jnp.searchsorted(trie.dense_nodes, node), 0, n_dense - 1)
    is_dense = (trie.dense_nodes[d] == node) & ~forced  # [B]
    mask = _unpack_bits(trie.dense_bits[jnp.where(is_dense, d, n_dense)], vocab)  # [B, V]
  else:
    is_dense = jnp.zeros_like(forced)
    mask = jnp.zeros((batch, vocab), bool)
  idx = start[:, None] + jnp.arange(trie.max_sparse_degree)  # [B, D]
  sparse = (idx < stop[:, None]) & ~(is_dense | forced)[:, None]
  kid_tok = jnp.where(sparse, trie.token[jnp.minimum(idx, trie.token.shape[0] - 1)], vocab)
  mask = mask.at[rows, kid_tok].set(True, mode="drop")
  mask = mask.at[rows, jnp.where(forced[:, None], vocab, exhausted_tok)].set(False, mode="drop")
  end_tok = jnp.where(end_ok & ~forced, _end_token(spec, state.count), vocab)  # [B]
  mask = mask.at[rows[:, 0], end_tok].set(True, mode="drop")
  return mask.at[rows[:, 0], jnp.where(forced, forced_tok, vocab)].set(True, mode="drop")


def advance(trie: TrieArrays, spec: ConstraintSpec, state: ConstraintState,
            token: jax.Array) -> ConstraintState:
  """Moves every row along `token` [B] (which must have been allowed)."""
  node, count = state.node, state.count
  start, stop = trie.first_child[node], trie.first_child[node + 1]
  idx = _segment_search(trie.token, start, stop, token, trie.search_steps)  # [B]
  child = jnp.clip(idx, 0, trie.token.shape[0] - 1)
  found = (idx >= start) & (trie.token[child] == token)
  in_delim = state.delim_pos >= 0
  finished = count >= spec.num_items
  ends = ~in_delim & ~finished & ~found & trie.terminal[node] & (token == _end_token(spec, count))

  # A row with no usable continuation is forced to EOS (`allowed_tokens`); that ends its list, so
  # a caller that continues after the list (`trigger_advance`) sees it as finished.
  stuck = ~in_delim & ~finished & ~found & ~ends & (token == spec.eos_token_id)

  # Item completed: record its leaf and ban it (the last banned slot is always a free sentinel).
  leaf = trie.leaf_lo[node]
  slot = jnp.arange(spec.num_items)[None, :] == count[:, None]  # [B, K]
  items = jnp.where(ends[:, None] & slot, leaf[:, None], state.items)
  banned = state.banned.at[:, -1].set(jnp.where(ends, leaf, state.banned[:, -1]))
  banned = jnp.sort(banned, axis=-1)
  count = jnp.where(stuck, spec.num_items, count + ends.astype(jnp.int32))

  n_delim = len(spec.delimiter)
  delim_pos = state.delim_pos + in_delim.astype(jnp.int32)  # consumed one delimiter token
  restart = (in_delim & (delim_pos >= n_delim)) | (ends & (count < spec.num_items) & (n_delim == 1))
  delim_pos = jnp.where(in_delim & (delim_pos >= n_delim), -1, delim_pos)
  if n_delim > 1:
    delim_pos = jnp.where(ends & (count < spec.num_items), 1, delim_pos)
  node = jnp.where(found & ~in_delim & ~finished, child, node)
  node = jnp.where(restart, 0, node)
  return ConstraintState(node=node, delim_pos=delim_pos, count=count, items=items, banned=banned)


# ----------------------------------------------------------------------------------------------
# Triggered lists: free text, then the trie after a trigger sequence, then a forced close
# ----------------------------------------------------------------------------------------------

FREE, LIST, CLOSE = 0, 1, 2  # TriggerState.phase


@dataclasses.dataclass(frozen=True)
class TriggerSpec:
  """Static part of a triggered constraint (hashable: it shapes the compiled program).

  trigger: token ids that open the item list (e.g. "<answer>\n"); matched in generated tokens.
  close: token ids forced after the K-th item (e.g. "\n</answer>"), then the constraint's EOS.
    close[0] takes the place of EOS as the K-th item's end token, so it must not continue a
    title at a node where another title ends (`check_trigger`).
  """

  trigger: tuple[int, ...]
  close: tuple[int, ...] = ()

  def borders(self) -> np.ndarray:
    """[L, L] bool: ok[j, k-1] iff, with the last j tokens = trigger[:j], a new token t makes the
    last k tokens = trigger[:k] exactly when t == trigger[k-1] (KMP: trigger[j-k+1:j] is a
    prefix of the trigger)."""
    t, n = self.trigger, len(self.trigger)
    return np.array([[k - 1 <= j and t[j - k + 1:j] == t[:k - 1] for k in range(1, n + 1)]
                     for j in range(n)], bool)


def check_trigger(constraint: CatalogConstraint, tspec: TriggerSpec) -> None:
  """Host: raises on a trigger / close that would break the list or end it early."""
  if not tspec.trigger:
    raise ValueError("constraint_trigger must be a non-empty sequence of token ids")
  eos = int(constraint.eos_token_id)
  if eos in tspec.close:
    raise ValueError(f"constraint_close {list(tspec.close)} contains the constraint's EOS {eos}: "
                     "EOS is appended after the close sequence")
  bad = [t for t in tspec.trigger + tspec.close if not 0 <= t < constraint.trie.vocab_size]
  if bad:
    raise ValueError(f"trigger/close token ids {bad} outside [0, {constraint.trie.vocab_size})")
  if tspec.close:
    constraint.trie.check_end_tokens([tspec.close[0]])


def _list_spec(spec: ConstraintSpec, tspec: TriggerSpec) -> ConstraintSpec:
  """The item-list spec inside a triggered constraint: the K-th item ends with close[0]."""
  end = (tspec.close + (spec.eos_token_id,))[0]
  return dataclasses.replace(spec, eos_token_id=end)


@flax.struct.dataclass
class TriggerState:
  """Per-row state of a triggered constraint; every field has the batch as its leading axis."""

  phase: jax.Array  # [B] int32: FREE (before the trigger), LIST (trie), CLOSE (forced tokens)
  match: jax.Array  # [B] int32 trigger tokens matched by the end of the free text (KMP state)
  close_pos: jax.Array  # [B] int32 next token of close + (EOS,) to force in the CLOSE phase
  inner: ConstraintState  # the item list; untouched outside the LIST phase


def trigger_init(trie: TrieArrays, spec: ConstraintSpec, tspec: TriggerSpec, batch: int,
                 history: jax.Array | None = None) -> TriggerState:
  """Start-of-generation state: every row free, nothing matched."""
  zeros = jnp.zeros((batch,), jnp.int32)
  return TriggerState(phase=zeros + FREE, match=zeros, close_pos=zeros,
                      inner=init_state(trie, _list_spec(spec, tspec), batch, history))


def trigger_active(state: TriggerState) -> jax.Array:
  """[B] bool: the row's next token is drawn under the constraint (list or close)."""
  return state.phase != FREE


def trigger_allowed(trie: TrieArrays, spec: ConstraintSpec, tspec: TriggerSpec,
                    state: TriggerState, *, skip_idle: bool = True) -> jax.Array:
  """[B, V] bool: all True for free rows, the trie mask in the list, one forced token after it.

  Rollouts spend most steps in free reasoning, so with `skip_idle` the masks are only built
  (`lax.cond`) on steps where some row is past its trigger.
  """
  batch, vocab = state.phase.shape[0], trie.vocab_size

  def build() -> jax.Array:
    mask = allowed_tokens(trie, _list_spec(spec, tspec), state.inner)  # [B, V]
    tail = jnp.asarray(tspec.close + (spec.eos_token_id,), jnp.int32)
    forced = tail[jnp.minimum(state.close_pos, tail.shape[0] - 1)]  # [B]
    one_hot = jnp.arange(vocab)[None, :] == forced[:, None]  # [B, V]
    mask = jnp.where((state.phase == CLOSE)[:, None], one_hot, mask)
    return mask | (state.phase == FREE)[:, None]

  if not skip_idle:
    return build()
  return jax.lax.cond(jnp.any(state.phase != FREE), build,
                      lambda: jnp.ones((batch, vocab), bool))


def _match_next(tspec: TriggerSpec, match: jax.Array, token: jax.Array) -> jax.Array:
  """KMP step: [B] matched lengths before `token` [B] -> after it (L = trigger complete)."""
  n = len(tspec.trigger)
  ok = jnp.asarray(tspec.borders())[jnp.clip(match, 0, n - 1)]  # [B, L]
  hit = ok & (jnp.asarray(tspec.trigger, jnp.int32)[None, :] == token[:, None])  # [B, L]
  return jnp.max(jnp.where(hit, jnp.arange(1, n + 1), 0), axis=-1).astype(jnp.int32)


def trigger_advance(trie: TrieArrays, spec: ConstraintSpec, tspec: TriggerSpec,
                    state: TriggerState, token: jax.Array, *,
                    skip_idle: bool = True) -> TriggerState:
  """Moves every row along `token` [B] (which must have been allowed).

  With `skip_idle` the trie walk only runs (`lax.cond`) on steps where some row is in its list.
  """
  free, listing = state.phase == FREE, state.phase == LIST
  match = jnp.where(free, _match_next(tspec, state.match, token), state.match)

  def walk() -> ConstraintState:
    new = advance(trie, _list_spec(spec, tspec), state.inner, token)
    return jax.tree.map(lambda a, b: jnp.where(listing.reshape((-1,) + (1,) * (a.ndim - 1)), a, b),
                        new, state.inner)

  inner = jax.lax.cond(jnp.any(listing), walk, lambda: state.inner) if skip_idle else walk()
  ended = listing & (inner.count >= spec.num_items)  # the token was close[0] (or EOS)
  phase = jnp.where(free & (match == len(tspec.trigger)), LIST, state.phase)
  phase = jnp.where(ended, CLOSE, phase)
  close_pos = state.close_pos + ((state.phase == CLOSE) | ended).astype(jnp.int32)
  return TriggerState(phase=phase.astype(jnp.int32), match=match, close_pos=close_pos, inner=inner)
