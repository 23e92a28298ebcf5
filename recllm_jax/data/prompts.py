"""Natural-language prompts, SFT targets and completion parsing for LLM recommendation.

A prompt is: optional user profile, the interaction history (titles plus
chosen attributes, oldest first, truncated from the *old* end to a token
budget so the most predictive recent items survive), and an instruction.
Targets are either the next title(s) directly or a short ``<think>``
rationale followed by ``<answer>``. Every piece of text comes from a
:class:`PromptConfig` template so experiments can change wording without
touching code, and so SFT, GRPO and evaluation render identical prompts.

Items are written by the run's item codec (:mod:`recllm_jax.data.items`): every function that
takes a ``catalog`` also takes an ``ItemCodec`` there; a plain :class:`Catalog` means titles.

The completion format is a contract shared with rewards and constrained
decoding (docs/data.md, "Completion format"): a chat template may already
open the think block in the prompt (the real DeepSeek-R1-Distill template
ends the generation prompt with ``<｜Assistant｜><think>\\n``), so the
completion is the assistant text minus what the prompt already wrote, and
:func:`parse_completion` reads exactly what generation produces after such a
prompt.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from recllm_jax.data.catalog import Catalog
from recllm_jax.data.items import ItemCodec, as_codec
from recllm_jax.data.schema import Example
from recllm_jax.data.tokenizer import EOS_TOKEN, PAD_TOKEN, Tokenizer, encode_prompt

__all__ = [
  "ALIGN_TASKS",
  "ANSWER_CLOSE",
  "AlignmentExample",
  "alignment_examples",
  "build_alignment_pair",
  "ANSWER_OPEN",
  "EMPTY_THINK",
  "PARSE_REASONS",
  "THINK_CLOSE",
  "THINK_OPEN",
  "TARGET_FORMATS",
  "ParsedCompletion",
  "PromptConfig",
  "SftPair",
  "build_prompt",
  "build_prompt_kept",
  "build_rationale",
  "build_sft_pair",
  "build_target",
  "history_spans",
  "count_tokens",
  "direct_answer_prefix",
  "extract_titles",
  "parse_completion",
  "prompt_opens_think",
  "render_history",
]

TARGET_FORMATS = ("direct", "cot")

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
# DeepSeek's form of "no reasoning": a direct answer after a prompt that opened a think block.
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
# What a think-opening generation prompt writes (the real R1 template); `build_target` assumes it.
_R1_OPENED = f"{THINK_OPEN}\n"

PARSE_REASONS = ("ok", "unclosed_think", "no_answer", "unclosed_answer", "empty_answer")
# Decoded generations may end with these when special tokens are not skipped.
_TRAILING_SPECIALS = (EOS_TOKEN, PAD_TOKEN)


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """All prompt wording and layout. Templates are ``str.format`` strings.

  Placeholders: ``user_template``: {profile} {history} {instruction}
  {answer_format}; ``plain_template``: {system} {user};
  ``history_item_template``: {index} {item} {title} {details} ({item}: the item as the run's
  item codec writes it, its title or its semantic ID; {title}: always the title, e.g.
  ``"{index}. {item} {title}\n"`` shows both beside a SID);
  ``direct_answer_format`` and ``cot_answer_format``: {noun} (the codec's name for the item
  text: "title", "semantic ID");
  ``details_template``: {attributes}; ``attribute_template`` and
  ``profile_field_template``: {name} {value}; ``profile_template``:
  {profile}; ``cot_template``: {rationale} {answer}.

  Assistant texts (item texts, e.g. titles, joined by ``item_delimiter``):

  * ``cot``: ``cot_template``, by default
    ``"<think>\\n{rationale}\\n</think>\\n\\n<answer>\\n{answer}\\n</answer>"``;
    it must start with ``"<think>\\n"`` for think-opening prompts.
  * ``direct``: ``"{titles}"``, or ``"<think>\\n\\n</think>\\n\\n{titles}"``
    (:data:`EMPTY_THINK`) when the prompt opens a think block.

  Titles follow a newline in every form (and the delimiter is a newline by
  default), so each title tokenizes exactly as it does in isolation, which is
  how the constrained decoder's catalog trie tokenizes titles.
  """

  instruction: str = "Based on this history, recommend the item the user is most likely to buy next."
  history_attributes: tuple[str, ...] = ("brand",)
  max_history_tokens: int = 512
  target_format: str = "direct"
  item_delimiter: str = "\n"
  use_chat_template: bool = True
  system_prompt: str | None = None

  direct_answer_format: str = "Reply with the exact {noun} of the item and nothing else."
  cot_answer_format: str = (
    "Think briefly inside <think></think>, then give the exact {noun} of the item inside <answer></answer>."
  )
  profile_template: str = "User profile: {profile}\n\n"
  profile_field_template: str = "{name}: {value}"
  profile_field_separator: str = "; "
  history_header: str = "Purchase history (oldest first):\n"
  history_item_template: str = "{index}. {item}{details}\n"
  details_template: str = " ({attributes})"
  attribute_template: str = "{name}: {value}"
  attribute_separator: str = ", "
  empty_history: str = "The user has no purchase history yet.\n"
  user_template: str = "{profile}{history}\n{instruction} {answer_format}"
  plain_template: str = "{system}{user}\n\nAnswer: "
  cot_template: str = f"{THINK_OPEN}\n{{rationale}}\n{THINK_CLOSE}\n\n{ANSWER_OPEN}\n{{answer}}\n{ANSWER_CLOSE}"
  rationale_window: int = 10
  # Alignment tasks (MiniOneRec), mixed into SFT by `data.align_tasks`: name one item by the
  # other name. {title}: the title; {item}: the item text (e.g. its SID); {noun}: what it is.
  title2item_template: str = 'Which item has the title "{title}"? Reply with its {noun} and nothing else.'
  item2title_template: str = "What is the title of the item {item}? Reply with the exact title and nothing else."

  def __post_init__(self) -> None:
    if self.target_format not in TARGET_FORMATS:
      raise ValueError(f"target_format must be one of {TARGET_FORMATS}, got {self.target_format!r}")
    if self.max_history_tokens < 0:
      raise ValueError(f"max_history_tokens must be >= 0, got {self.max_history_tokens}")
    if not self.item_delimiter:
      raise ValueError("item_delimiter must be non-empty")
    if self.rationale_window < 1:
      raise ValueError(f"rationale_window must be >= 1, got {self.rationale_window}")
    # tuple() so a list from a YAML/ml_collections config keeps the dataclass hashable.
    object.__setattr__(self, "history_attributes", tuple(self.history_attributes))


@dataclasses.dataclass(frozen=True)
class SftPair:
  """One SFT example as text: loss is computed on ``completion`` (plus the EOS) only.

  ``history_kept`` of the example's ``history_total`` history items are shown in the prompt
  (fewer when the history budget cut the oldest ones). ``history_spans``: ``(start, end)``
  character spans in ``prompt`` of the shown history items after the first, trained on as
  well when ``build_sft_pair(..., history_loss=True)`` (each is the next item of the ones
  before it); empty otherwise.
  """

  prompt: str
  completion: str
  history_kept: int = 0
  history_total: int = 0
  history_spans: tuple[tuple[int, int], ...] = ()

  @property
  def history_truncated(self) -> bool:
    return self.history_kept < self.history_total


@dataclasses.dataclass(frozen=True)
class ParsedCompletion:
  """Result of :func:`parse_completion`: the answered titles, and ``reason`` (``"ok"`` or why not).

  ``titles`` is empty unless ``reason == "ok"``.
  """

  titles: tuple[str, ...]
  reason: str

  @property
  def ok(self) -> bool:
    return self.reason == "ok"


def count_tokens(text: str, tokenizer: Tokenizer | None) -> int:
  """Tokens in ``text`` without special tokens; whitespace words when no tokenizer."""
  if tokenizer is None:
    return len(text.split())
  return len(tokenizer.encode(text, add_special_tokens=False))


def _label(name: str) -> str:
  return name.replace("_", " ")


def _value(value: Any) -> str:
  """Single-line text for an attribute value; lists (e.g. category paths) joined with ' > '."""
  if isinstance(value, (list, tuple)):
    value = " > ".join(str(v) for v in value)
  return " ".join(str(value).split())


def _present(value: Any) -> bool:
  return value is not None and _value(value) != ""


def _render_details(attributes: Mapping[str, Any], cfg: PromptConfig) -> str:
  parts = [
    cfg.attribute_template.format(name=_label(name), value=_value(attributes[name]))
    for name in cfg.history_attributes
    if _present(attributes.get(name))
  ]
  return cfg.details_template.format(attributes=cfg.attribute_separator.join(parts)) if parts else ""


def _render_items(item_ids: Sequence[str], items: Catalog | ItemCodec, cfg: PromptConfig) -> str:
  codec = as_codec(items)
  return "".join(
    cfg.history_item_template.format(
      index=index,
      item=codec.text(item_id),
      title=codec.catalog[item_id].title,
      details=_render_details(codec.catalog[item_id].attributes, cfg),
    )
    for index, item_id in enumerate(item_ids, start=1)
  )


def render_history(
  example: Example, catalog: Catalog | ItemCodec, tokenizer: Tokenizer | None, cfg: PromptConfig,
  *, max_tokens: int | None = None,
) -> tuple[str, int]:
  """Render the history block; returns ``(text, number of items kept)``.

  Keeps the longest suffix (newest items) whose item lines fit in
  ``max_tokens`` tokens (default ``cfg.max_history_tokens``; the header is
  not counted), found by binary search since the size grows with the number
  of items. At least the newest item is always kept: a prompt with no
  history cannot be answered, so one long title may exceed the budget.
  """
  history = example.history
  if not history:
    return cfg.empty_history, 0
  budget = cfg.max_history_tokens if max_tokens is None else max_tokens

  def fits(k: int) -> bool:
    return count_tokens(_render_items(history[-k:], catalog, cfg), tokenizer) <= budget

  lo, hi = 1, len(history)  # invariant: lo items are kept (fits or minimum), answer in [lo, hi]
  if fits(hi):  # the common case costs a single tokenizer call
    lo = hi
  else:
    hi -= 1
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid - 1
  return cfg.history_header + _render_items(history[-lo:], catalog, cfg), lo


def _render_profile(profile: Mapping[str, Any] | None, cfg: PromptConfig) -> str:
  if not profile:
    return ""
  fields = [
    cfg.profile_field_template.format(name=_label(str(name)), value=_value(value))
    for name, value in profile.items()
    if _present(value)
  ]
  return cfg.profile_template.format(profile=cfg.profile_field_separator.join(fields)) if fields else ""


def build_prompt_kept(
  example: Example, catalog: Catalog | ItemCodec, tokenizer: Tokenizer | None, cfg: PromptConfig,
  history_tokens: int | None = None,
) -> tuple[str, int]:
  """:func:`build_prompt`'s text and how many history items it shows: the newest ones, fewer than
  the history when the budget (``history_tokens``, default ``cfg.max_history_tokens``) cut the
  oldest."""
  history, kept = render_history(example, catalog, tokenizer, cfg, max_tokens=history_tokens)
  answer_format = cfg.cot_answer_format if cfg.target_format == "cot" else cfg.direct_answer_format
  answer_format = answer_format.format(noun=as_codec(catalog).noun)
  user = cfg.user_template.format(
    profile=_render_profile(example.profile, cfg),
    history=history,
    instruction=cfg.instruction,
    answer_format=answer_format,
  )
  return _render_turn(user, tokenizer, cfg), kept


def _render_turn(user: str, tokenizer: Tokenizer | None, cfg: PromptConfig) -> str:
  """A user message as the prompt text: the tokenizer's chat template (with the generation
  prompt) when it has one and ``cfg.use_chat_template``, else ``cfg.plain_template``."""
  if cfg.use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages.append({"role": "user", "content": user})
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
  system = f"{cfg.system_prompt}\n\n" if cfg.system_prompt else ""
  return cfg.plain_template.format(system=system, user=user)


def build_prompt(example: Example, catalog: Catalog | ItemCodec, tokenizer: Tokenizer | None, cfg: PromptConfig) -> str:
  """The full prompt text, ending where the model's completion starts.

  Uses the tokenizer's chat template (with the generation prompt) when it
  has one and ``cfg.use_chat_template``; otherwise ``cfg.plain_template``.
  The prompt never depends on the targets, so the same text is used for
  SFT, GRPO rollouts and evaluation. Encode it with
  :func:`recllm_jax.data.tokenizer.encode_prompt` (exactly one BOS).
  """
  return build_prompt_kept(example, catalog, tokenizer, cfg)[0]


def prompt_opens_think(prompt: str) -> bool:
  """Whether ``prompt`` ends (ignoring trailing whitespace) with an unclosed ``<think>``.

  True for the real DeepSeek-R1-Distill generation prompt (``...<｜Assistant｜><think>\\n``),
  False for the offline BPE's template and the plain template. The completion then starts
  inside the think block.
  """
  return prompt.rstrip().endswith(THINK_OPEN)


def build_rationale(
  example: Example, catalog: Catalog | ItemCodec, cfg: PromptConfig, *, visible_items: int | None = None
) -> str:
  """A short templated reasoning text for CoT SFT.

  Built from the newest ``cfg.rationale_window`` history items, further
  limited to ``visible_items`` (how many the truncated prompt shows, so the
  rationale never cites items the model cannot see), and the first
  target's attributes,
  one sentence per line: the most recent item, the most frequent value of
  each ``history_attributes`` entry, and the attributes the answer has. It
  teaches the *shape* of useful reasoning (pattern, then attributes, then
  title); GRPO later improves the content.
  """
  codec = as_codec(catalog)
  catalog = codec.catalog
  window = cfg.rationale_window if visible_items is None else min(cfg.rationale_window, visible_items)
  recent = example.history[-window:] if window > 0 else ()
  lines: list[str] = []
  if recent:
    lines.append(f'The most recent item is "{codec.text(recent[-1])}".')
  else:
    lines.append("The user has no history, so a generally popular item is a reasonable choice.")
  for name in cfg.history_attributes:
    values = [_value(catalog[i].attributes[name]) for i in recent if _present(catalog[i].attributes.get(name))]
    if values:
      counts = collections.Counter(values)
      top = max(counts.values())
      # Ties go to the most recent value: recency is the stronger signal.
      value = next(v for v in reversed(values) if counts[v] == top)
      lines.append(f"Most frequent {_label(name)}: {value} ({top} of {len(recent)} recent items).")
  target = catalog[example.targets[0]].attributes
  wanted = [
    f"{_label(name)} {_value(target[name])}" for name in cfg.history_attributes if _present(target.get(name))
  ]
  if wanted:
    lines.append(f"The next item is likely: {', '.join(wanted)}.")
  return "\n".join(lines)


def direct_answer_prefix(think_open: bool) -> str:
  """What a ``direct`` completion writes before its first title: ``"\\n</think>\\n\\n"`` after a
  prompt that opened a think block with ``"<think>\\n"``, else nothing."""
  return EMPTY_THINK.removeprefix(_R1_OPENED) if think_open else ""


def _assistant_text(
  example: Example, catalog: Catalog | ItemCodec, cfg: PromptConfig, visible_items: int | None, think_open: bool
) -> str:
  """The whole assistant turn, including any think opening the prompt may already hold."""
  codec = as_codec(catalog)
  answer = cfg.item_delimiter.join(codec.text(item_id) for item_id in example.targets)
  if cfg.target_format == "direct":
    return EMPTY_THINK + answer if think_open else answer
  rationale = build_rationale(example, catalog, cfg, visible_items=visible_items)
  return cfg.cot_template.format(rationale=rationale, answer=answer)


def _after_prompt(text: str, opened: str) -> str:
  """``text`` minus ``opened``, the think opening the prompt already wrote."""
  if not text.startswith(opened):
    raise ValueError(
      f"the prompt ends with {opened!r} (it opens a think block), but the target starts with "
      f"{text[:len(opened) + 20]!r}; cot_template must start with {_R1_OPENED!r}"
    )
  return text[len(opened):]


def build_target(
  example: Example, catalog: Catalog | ItemCodec, cfg: PromptConfig, *, visible_items: int | None = None,
  think_open: bool = False,
) -> str:
  """The completion text (without eos; the data pipeline appends it).

  With ``think_open`` the prompt is taken to end with ``"<think>\\n"`` (the
  real R1 generation prompt) and the completion starts inside that block:

  * ``cot``: ``"{rationale}\\n</think>\\n\\n<answer>\\n{titles}\\n</answer>"``
    (``"<think>\\n"`` prepended without ``think_open``);
  * ``direct``: ``"\\n</think>\\n\\n{titles}"``, or just ``"{titles}"``
    without ``think_open``.

  ``visible_items`` only matters for ``cot`` (see :func:`build_rationale`).
  :func:`build_sft_pair` passes both automatically from the rendered prompt.
  """
  text = _assistant_text(example, catalog, cfg, visible_items, think_open)
  return _after_prompt(text, _R1_OPENED) if think_open else text


def _sft_pair(
  example: Example, catalog: Catalog | ItemCodec, tokenizer: Tokenizer | None, cfg: PromptConfig,
  history_tokens: int | None,
) -> SftPair:
  prompt, kept = build_prompt_kept(example, catalog, tokenizer, cfg, history_tokens)
  think_open = prompt_opens_think(prompt)
  text = _assistant_text(example, catalog, cfg, kept, think_open)
  # Whatever the prompt wrote after its last "<think>" (normally "<think>\n") is not repeated.
  opened = prompt[prompt.rindex(THINK_OPEN):] if think_open else ""
  return SftPair(prompt, _after_prompt(text, opened), kept, len(example.history))


# Stands for {item} when locating it in a rendered history line (no item text contains it).
_ITEM_MARKER = "\x00"


def history_spans(prompt: str, example: Example, catalog: Catalog | ItemCodec, cfg: PromptConfig,
                  kept: int) -> tuple[tuple[int, int], ...]:
  """Character spans in ``prompt`` of the item texts of the shown history items 2..``kept``.

  Found by rendering the history block again and locating it in the prompt; () if the block
  does not occur verbatim (a chat template that rewrites the user text).
  """
  codec = as_codec(catalog)
  shown = example.history[-kept:] if kept else ()
  block_start = prompt.find(cfg.history_header + _render_items(shown, codec, cfg))
  if block_start < 0 or len(shown) < 2:
    return ()
  spans, cursor = [], block_start + len(cfg.history_header)
  for index, item_id in enumerate(shown, start=1):
    text = codec.text(item_id)
    # Rendered once with a marker for {item}: where the marker sits is where the item starts,
    # wherever the template puts it (first, after the index or the title). Without {item},
    # another field may still write the item text ({title}, when items are titles).
    marked = cfg.history_item_template.format(
      index=index, item=_ITEM_MARKER, title=codec.catalog[item_id].title,
      details=_render_details(codec.catalog[item_id].attributes, cfg))
    line = marked.replace(_ITEM_MARKER, text)
    at = marked.find(_ITEM_MARKER)
    if at < 0:
      at = line.find(text)
    if index > 1 and at >= 0:
      spans.append((cursor + at, cursor + at + len(text)))
    cursor += len(line)
  return tuple(spans)


def build_sft_pair(
  example: Example, catalog: Catalog | ItemCodec, tokenizer: Tokenizer | None, cfg: PromptConfig,
  *, max_length: int | None = None, history_loss: bool = False,
) -> SftPair:
  """The prompt and completion of one example; loss is computed on the completion only.

  With ``max_length`` (the pipeline's inputs per sequence, i.e. ``max_length + 1``
  tokens of prompt, completion and EOS) and a tokenizer, the history is budgeted so the
  sequence fits: its token budget becomes ``min(cfg.max_history_tokens, what remains of
  max_length after the rest of the prompt and the completion)``. The BOS, the template
  header and the instruction are never cut; only old history items are. The completion
  is recomputed for the items that stay visible (the CoT rationale cites only those).
  If even the newest item alone does not fit, the pipeline cuts the completion's tail.
  ``history_loss``: fill ``history_spans`` (see :class:`SftPair`).
  """
  pair = _budgeted_pair(example, catalog, tokenizer, cfg, max_length)
  if not history_loss:
    return pair
  spans = history_spans(pair.prompt, example, catalog, cfg, pair.history_kept)
  return dataclasses.replace(pair, history_spans=spans)


def _budgeted_pair(example: Example, catalog: Catalog | ItemCodec, tokenizer: Tokenizer | None,
                   cfg: PromptConfig, max_length: int | None) -> SftPair:
  pair = _sft_pair(example, catalog, tokenizer, cfg, None)
  if max_length is None or tokenizer is None:
    return pair
  while pair.history_kept > 1:
    # Tokens of prompt + completion + eos, against the max_length + 1 a sequence may hold.
    total = len(encode_prompt(tokenizer, pair.prompt)) + count_tokens(pair.completion, tokenizer) + 1
    over = total - (max_length + 1)
    if over <= 0:
      break
    kept_tokens = count_tokens(_render_items(example.history[-pair.history_kept:], catalog, cfg), tokenizer)
    # The history shrinks by at least the overshoot. Token counts are not exactly additive
    # (the rationale changes too), hence the loop; it keeps strictly fewer items every pass.
    smaller = _sft_pair(example, catalog, tokenizer, cfg, kept_tokens - over)
    if smaller.history_kept >= pair.history_kept:  # only with non-monotone token counts
      break
    pair = smaller
  return pair


ALIGN_TASKS = ("title2item", "item2title")


@dataclasses.dataclass(frozen=True)
class AlignmentExample:
  """An alignment task on one catalog item (MiniOneRec): its title -> its item text (e.g. the
  semantic ID), or back. Mixed into SFT by ``data.align_tasks`` so that the item codes and the
  titles a pretrained model knows name the same things."""

  item_id: str
  task: str

  def __post_init__(self) -> None:
    if self.task not in ALIGN_TASKS:
      raise ValueError(f"alignment task {self.task!r}; expected one of {ALIGN_TASKS}")


def build_alignment_pair(example: AlignmentExample, catalog: Catalog | ItemCodec,
                         tokenizer: Tokenizer | None, cfg: PromptConfig) -> SftPair:
  """Prompt and completion of an alignment task, through the same chat template as
  recommendation prompts; the answer is direct (an empty think block under the R1 template)."""
  codec = as_codec(catalog)
  title, item = codec.catalog[example.item_id].title, codec.text(example.item_id)
  if example.task == "title2item":
    user, answer = cfg.title2item_template.format(title=title, item=item, noun=codec.noun), item
  else:
    user, answer = cfg.item2title_template.format(title=title, item=item, noun=codec.noun), title
  prompt = _render_turn(user, tokenizer, cfg)
  return SftPair(prompt, direct_answer_prefix(prompt_opens_think(prompt)) + answer)


def alignment_examples(catalog: Catalog | ItemCodec, tasks: Sequence[str]) -> list[AlignmentExample]:
  """One `AlignmentExample` per catalog item and task, catalog order."""
  return [AlignmentExample(item.item_id, task) for task in tasks for item in as_codec(catalog).catalog]


def _strip_trailing(text: str) -> str:
  """``text`` without trailing whitespace and decoded EOS/pad tokens."""
  while True:
    stripped = text.rstrip()
    for special in _TRAILING_SPECIALS:
      stripped = stripped.removesuffix(special)
    if stripped == text:
      return text
    text = stripped


def _titles(text: str, cfg: PromptConfig) -> ParsedCompletion:
  titles = tuple(t.strip() for t in text.split(cfg.item_delimiter) if t.strip())
  return ParsedCompletion(titles, "ok") if titles else ParsedCompletion((), "empty_answer")


def parse_completion(completion: str, cfg: PromptConfig, *, think_open: bool = False) -> ParsedCompletion:
  """The titles a completion answers, or why it is malformed (the inverse of :func:`build_target`).

  ``think_open``: the prompt opened a think block (:func:`prompt_opens_think`), so the
  completion starts inside it. Trailing whitespace and decoded EOS/pad tokens are ignored.

  * A think block is open when ``think_open`` or the completion starts with ``<think>``
    (ignoring leading whitespace); ``cot`` always requires one. Its first ``</think>``
    closes it, and everything before that is reasoning. No ``</think>``: ``"unclosed_think"``.
  * ``cot``: the answer is inside the first ``<answer>...</answer>`` after the think block:
    ``"no_answer"`` without ``<answer>``, ``"unclosed_answer"`` without ``</answer>``.
    Text after ``</answer>`` is ignored.
  * ``direct``: the answer is everything after the think block (or the whole completion).

  Titles are split on ``cfg.item_delimiter`` and stripped; empty pieces are dropped; no
  title left: ``"empty_answer"``.
  """
  text = _strip_trailing(completion)
  cot = cfg.target_format == "cot"
  if cot or think_open or text.lstrip().startswith(THINK_OPEN):
    end = text.find(THINK_CLOSE)
    if end < 0:
      return ParsedCompletion((), "unclosed_think")
    text = text[end + len(THINK_CLOSE):]
  if not cot:
    return _titles(text, cfg)
  start = text.find(ANSWER_OPEN)
  if start < 0:
    return ParsedCompletion((), "no_answer")
  start += len(ANSWER_OPEN)
  end = text.find(ANSWER_CLOSE, start)
  if end < 0:
    return ParsedCompletion((), "unclosed_answer")
  return _titles(text[start:end], cfg)


def extract_titles(completion: str, cfg: PromptConfig, *, think_open: bool = False) -> list[str] | None:
  """The titles of :func:`parse_completion` as a list, or ``None`` when it is malformed."""
  parsed = parse_completion(completion, cfg, think_open=think_open)
  return list(parsed.titles) if parsed.ok else None
