"""Collaborative-filtering priors over the catalog, for CF-guided decoding (D3, Bao et al. 2024).

A title-generating LLM trained on few examples knows titles but little about which item follows
which; the baselines know exactly that. D3 mixes a CF model's score into the LLM's constrained
beam search (`recllm_jax.decoding.beam_search(prior=..., prior_weight=...)`), so each example
needs a log-probability for every catalog item. This module turns the fitted baselines of
`recllm_jax.rec.baselines` (fitted on the training split exactly as ``scripts/baselines.py``
fits them) into such distributions:

* ``markov``: p(next | last history item) from the transition counts, mixed with popularity;
  rows whose last item has no recorded successor (or no history) fall back to popularity.
* ``sasrec``: the softmax of SASRec's catalog scores, mixed with popularity.
* ``mix``: the average of the two distributions above.

Popularity is add-one smoothed target counts, and every distribution is
``(1 - smoothing) * p_model + smoothing * p_pop``, so every item has a finite log-probability
(an item with zero CF mass would otherwise be unreachable in the beam).

Fit once, reuse: SASRec takes minutes to fit on Office, and scripts/reproduce.sh needs the same
fitted models four times (the SASRec baseline, the CF-guided evaluations of SFT and GRPO). So
the fitted state is a value of its own (`CFModels`: popularity, Markov transition counts, SASRec
parameters), `save_cf_models` writes it next to the baselines' results (``cf_models.json``, a
manifest with the SASRec config and a fingerprint of the data it was fitted on, and
``cf_models.npz``), and `load_cf_models` gives it back only for the same data and config, so a
loaded prior is the prior a fresh fit would give (``scripts/evaluate.py --cf_from``).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recllm_jax.data import Example, RecDataset
from recllm_jax.errors import ConfigError, MissingPathError, UserError
from recllm_jax.rec.baselines.markov import transition_counts
from recllm_jax.rec.baselines.popularity import target_counts
from recllm_jax.rec.baselines.run import fit_baseline
from recllm_jax.rec.baselines.sasrec import SASRecConfig, SASRecRecommender

__all__ = ["CF_MODELS", "CFModels", "CFModelsMismatch", "CFPrior", "data_fingerprint",
           "fit_cf_models", "fit_prior", "load_cf_models", "popularity_probs", "prior_from_models",
           "save_cf_models"]

CF_MODELS = ("markov", "sasrec", "mix")
MANIFEST = "cf_models.json"  # what save_cf_models writes into its directory
ARRAYS = "cf_models.npz"
_FORMAT_VERSION = 1


class CFModelsMismatch(UserError, ValueError):
  """Saved CF models that were fitted on other data or with another config than asked for."""


@dataclasses.dataclass(frozen=True)
class CFPrior:
  """A fitted CF prior: ``prior(examples)`` -> ``[N, I]`` float64 log-probs, catalog order.

  ``item_ids[j]`` is column j (the catalog's item order, the order `ItemTrie.from_catalog`
  numbers items in); rows sum to 1 in probability.
  """

  name: str
  item_ids: tuple[str, ...]
  probs: Callable[[Sequence[Example]], np.ndarray]  # examples -> [N, I] probabilities

  def __call__(self, examples: Sequence[Example]) -> np.ndarray:
    with np.errstate(divide="ignore"):
      return np.log(self.probs(examples))  # [N, I]

  def chunked(self, examples: Sequence[Example], chunk: int = 512) -> CFPrior:
    """This prior for batches drawn from ``examples`` (the same objects, any order), computed
    ``chunk`` examples at a time.

    Why: the beam asks for one prompt batch at a time (32 rows), and SASRec scores in batches
    of 512 (one compiled shape), so each beam batch paid for 512 rows: 6.5 s of host time per
    Office test pass for `mix`, against 1 s chunked. The values are the same bits: each row is
    computed by the same 512-row program, and nothing mixes rows. The two newest chunks are
    kept (a beam batch may straddle two); examples not in ``examples`` are computed directly.
    """
    if chunk < 1:
      raise ValueError(f"chunk must be >= 1, got {chunk}")
    position = {id(ex): i for i, ex in enumerate(examples)}
    cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def rows_of(start: int) -> np.ndarray:
      if start not in cache:
        cache[start] = self.probs(examples[start:start + chunk])  # [<=chunk, I]
        while len(cache) > 2:
          cache.popitem(last=False)
      return cache[start]

    def probs(batch: Sequence[Example]) -> np.ndarray:
      where = [position.get(id(ex)) for ex in batch]
      if any(i is None or examples[i] is not ex for i, ex in zip(where, batch)):
        return self.probs(batch)
      out = np.empty((len(batch), len(self.item_ids)), np.float64)  # [N, I]
      for row, i in enumerate(where):
        out[row] = rows_of(i - i % chunk)[i % chunk]
      return out

    return CFPrior(self.name, self.item_ids, probs)

  def recommend(self, examples: Sequence[Example], k: int) -> list[list[str]]:
    """Top-``k`` ids per example by the prior alone (ties: catalog order): the CF-only ablation."""
    probs = self.probs(examples)  # [N, I]
    top = np.argsort(-probs, axis=1, kind="stable")[:, :min(k, len(self.item_ids))]  # [N, k]
    return [[self.item_ids[j] for j in row] for row in top]


@dataclasses.dataclass(frozen=True)
class CFModels:
  """What the priors are built from, fitted on one dataset's training split.

  ``sasrec`` is None when SASRec was not fitted (a ``markov`` prior needs none);
  ``fingerprint`` is `data_fingerprint` of the dataset fitted on.
  """

  item_ids: tuple[str, ...]
  popularity: np.ndarray  # [I] popularity_probs of the training split
  transitions: Mapping[str, Mapping[str, int]]  # transition_counts of the training split
  sasrec: SASRecRecommender | None
  sasrec_config: SASRecConfig | None
  fingerprint: Mapping[str, Any]


def popularity_probs(train: Sequence[Example], item_ids: Sequence[str]) -> np.ndarray:
  """[I] add-one smoothed distribution of training targets (the popularity baseline's counts)."""
  counts = target_counts(train)
  p = np.array([counts[i] for i in item_ids], np.float64) + 1.0
  return p / p.sum()


def _digest(rows: Iterable[Any]) -> str:
  h = hashlib.sha256()
  for row in rows:
    h.update(json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n")
  return h.hexdigest()


def data_fingerprint(dataset: RecDataset) -> dict[str, Any]:
  """What a fit depends on in ``dataset``: the catalog's ids in order (the score columns), the
  training examples (everything is fitted on them) and the validation examples (SASRec stops
  early on them), as counts and SHA-256 digests, so that a saved fit is only reused for the same
  data."""
  examples = lambda split: ([ex.user_id, list(ex.history), list(ex.targets)] for ex in split)
  return {"num_items": len(dataset.catalog),
          "items_sha256": _digest(item.item_id for item in dataset.catalog),
          "num_train": len(dataset.train), "train_sha256": _digest(examples(dataset.train)),
          "num_valid": len(dataset.valid), "valid_sha256": _digest(examples(dataset.valid))}


def _needs_sasrec(name: str) -> bool:
  return name in ("sasrec", "mix")


def _check_name(name: str, smoothing: float) -> None:
  if name not in CF_MODELS:
    raise ConfigError(f"unknown CF prior {name!r}; expected one of {list(CF_MODELS)}")
  if not 0.0 < smoothing <= 1.0:
    raise ConfigError(f"CF prior smoothing must be in (0, 1], got {smoothing}: 0 leaves items "
                      "without CF mass unreachable")


def fit_cf_models(dataset: RecDataset, *, sasrec: SASRecConfig | None = SASRecConfig(),
                  sasrec_model: SASRecRecommender | None = None,
                  progress: bool = False) -> CFModels:
  """Fits every CF model on ``dataset.train``: popularity and Markov counts always (they take
  well under a second), SASRec unless ``sasrec`` is None.

  SASRec is fitted by `recllm_jax.rec.baselines.fit_baseline` (early stopping on
  ``dataset.valid``), exactly as scripts/baselines.py fits its baseline; pass that baseline as
  ``sasrec_model`` (fitted with ``sasrec``) to reuse it instead of fitting it again.
  """
  item_ids = tuple(item.item_id for item in dataset.catalog)
  model = None
  if sasrec is not None:
    model = sasrec_model or fit_baseline("sasrec", dataset, sasrec=sasrec, progress=progress)
    if model.item_ids != item_ids:
      raise ValueError("the SASRec model was fitted on another catalog order")
  transitions = {item: dict(nexts) for item, nexts in transition_counts(dataset.train).items()}
  return CFModels(item_ids=item_ids, popularity=popularity_probs(dataset.train, item_ids),
                  transitions=transitions, sasrec=model, sasrec_config=sasrec,
                  fingerprint=data_fingerprint(dataset))


def _markov_probs(models: CFModels, smoothing: float) -> Callable[[Sequence[Example]], np.ndarray]:
  column = {item_id: j for j, item_id in enumerate(models.item_ids)}
  pop = models.popularity
  # successors[i] = (columns [S], p [S]) of the items that followed item i in training.
  successors = {}
  for item, nexts in models.transitions.items():
    cols = np.array([column[j] for j in nexts], np.int64)
    counts = np.array(list(nexts.values()), np.float64)
    successors[item] = (cols, counts / counts.sum())

  def probs(examples: Sequence[Example]) -> np.ndarray:
    out = np.repeat(pop[None], len(examples), axis=0)  # [N, I]
    for row, ex in enumerate(examples):
      if ex.history and ex.history[-1] in successors:
        cols, p = successors[ex.history[-1]]
        out[row] *= smoothing
        out[row, cols] += (1.0 - smoothing) * p
    return out

  return probs


def _sasrec_probs(model: SASRecRecommender, pop: np.ndarray, smoothing: float
                  ) -> Callable[[Sequence[Example]], np.ndarray]:
  def probs(examples: Sequence[Example]) -> np.ndarray:
    scores = np.asarray(model.scores(examples), np.float64)  # [N, I]
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    return (1.0 - smoothing) * scores / scores.sum(axis=1, keepdims=True) + smoothing * pop

  return probs


def prior_from_models(name: str, models: CFModels, *, smoothing: float = 0.1) -> CFPrior:
  """The CF prior ``name`` (one of `CF_MODELS`) of fitted ``models``."""
  _check_name(name, smoothing)
  parts = []
  if name in ("markov", "mix"):
    parts.append(_markov_probs(models, smoothing))
  if _needs_sasrec(name):
    if models.sasrec is None:
      raise ConfigError(f"the CF prior {name!r} needs SASRec, and these CF models have none")
    parts.append(_sasrec_probs(models.sasrec, models.popularity, smoothing))
  if len(parts) == 1:
    return CFPrior(name, models.item_ids, parts[0])
  return CFPrior(name, models.item_ids, lambda examples: sum(p(examples) for p in parts) / len(parts))


def fit_prior(name: str, dataset: RecDataset, *, smoothing: float = 0.1,
              sasrec: SASRecConfig = SASRecConfig(), progress: bool = False) -> CFPrior:
  """The CF prior ``name`` (one of `CF_MODELS`) fitted on ``dataset.train``.

  SASRec is fitted by `recllm_jax.rec.baselines.fit_baseline` (early stopping on
  ``dataset.valid``), with the ``sasrec`` settings of ``configs/baselines.py``.
  """
  _check_name(name, smoothing)
  models = fit_cf_models(dataset, sasrec=sasrec if _needs_sasrec(name) else None,
                         progress=progress)
  return prior_from_models(name, models, smoothing=smoothing)


def save_cf_models(models: CFModels, directory: str | Path) -> Path:
  """Writes ``models`` into ``directory`` (``cf_models.json`` + ``cf_models.npz``); returns the
  manifest's path. The arrays are written first, so a manifest always names complete arrays."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  column = {item_id: j for j, item_id in enumerate(models.item_ids)}
  pairs = [(column[a], column[b], n) for a, nexts in models.transitions.items()
           for b, n in nexts.items()]
  src, dst, count = (np.array(x, np.int64).reshape(-1) for x in zip(*pairs)) if pairs else (
      np.zeros(0, np.int64),) * 3
  arrays = {"popularity": models.popularity, "markov_src": src, "markov_dst": dst,
            "markov_count": count}
  if models.sasrec is not None:
    arrays.update({f"sasrec/{k}": v for k, v in models.sasrec.param_arrays().items()})
  tmp = directory / (ARRAYS + ".tmp.npz")
  np.savez(tmp, **arrays)
  tmp.replace(directory / ARRAYS)
  manifest = {
    "version": _FORMAT_VERSION,
    "fingerprint": dict(models.fingerprint),
    "sasrec": None if models.sasrec is None else {
      "config": dataclasses.asdict(models.sasrec_config),
      "best_epoch": models.sasrec.best_epoch, "history": models.sasrec.history},
  }
  out = directory / MANIFEST
  out.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
  return out


def _differences(saved: Mapping[str, Any], here: Mapping[str, Any]) -> str:
  keys = sorted(k for k in set(saved) | set(here) if saved.get(k) != here.get(k))
  show = lambda v: f"{v[:12]}..." if isinstance(v, str) and len(v) > 16 else repr(v)
  return ", ".join(f"{k} {show(saved.get(k))} (saved) vs {show(here.get(k))} (here)" for k in keys)


def load_cf_models(directory: str | Path, dataset: RecDataset, *,
                   sasrec: SASRecConfig | None = None) -> CFModels:
  """The `save_cf_models` of ``directory``, checked against ``dataset`` and the SASRec config a
  fresh fit would use (``sasrec``; None: SASRec is not needed and not loaded).

  Raises `CFModelsMismatch` (a `UserError`) when the saved fit was made on other data or with
  another SASRec config, or lacks SASRec when ``sasrec`` is given: reusing it would silently
  give another prior than fitting in place. `MissingPathError` when nothing was saved there.
  """
  directory = Path(directory)
  manifest_path, arrays_path = directory / MANIFEST, directory / ARRAYS
  if not manifest_path.is_file() or not arrays_path.is_file():
    raise MissingPathError(f"{directory}: no saved CF models ({MANIFEST} + {ARRAYS}); "
                           "scripts/baselines.py writes them into its workdir")
  manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
  if manifest.get("version") != _FORMAT_VERSION:
    raise CFModelsMismatch(f"{manifest_path}: format version {manifest.get('version')!r}, "
                           f"expected {_FORMAT_VERSION}; rerun scripts/baselines.py")
  fingerprint = data_fingerprint(dataset)
  if manifest["fingerprint"] != fingerprint:
    raise CFModelsMismatch(f"{manifest_path} was fitted on other data: "
                           f"{_differences(manifest['fingerprint'], fingerprint)}")
  item_ids = tuple(item.item_id for item in dataset.catalog)
  model = None
  with np.load(arrays_path) as arrays:
    popularity = np.asarray(arrays["popularity"], np.float64)
    src, dst, count = (arrays[k] for k in ("markov_src", "markov_dst", "markov_count"))
    transitions: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for a, b, n in zip(src.tolist(), dst.tolist(), count.tolist()):
      transitions[item_ids[a]][item_ids[b]] = n
    if sasrec is not None:
      saved = manifest.get("sasrec")
      if saved is None:
        raise CFModelsMismatch(f"{manifest_path} holds no SASRec fit (baselines without sasrec?)"
                               "; the prior needs one")
      want = dataclasses.asdict(sasrec)
      if saved["config"] != want:
        raise CFModelsMismatch(f"{manifest_path}: SASRec was fitted with another config: "
                               f"{_differences(saved['config'], want)}")
      params = {k[len("sasrec/"):]: arrays[k] for k in arrays.files if k.startswith("sasrec/")}
      model = SASRecRecommender.from_param_arrays(params, item_ids, sasrec,
                                                  history=saved["history"],
                                                  best_epoch=saved["best_epoch"])
  return CFModels(item_ids=item_ids, popularity=popularity, transitions=dict(transitions),
                  sasrec=model, sasrec_config=sasrec, fingerprint=fingerprint)
