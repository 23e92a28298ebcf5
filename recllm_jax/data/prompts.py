"""Natural-language prompts and SFT targets for LLM recommendation.

A prompt is: optional user profile, the interaction history (titles plus
chosen attributes, oldest first, truncated from the *old* end to a token
budget so the most predictive recent items survive), and an instruction.
Targets are either the next title(s) directly or a short ``<think>``
rationale followed by ``<answer>``. Every piece of text comes from a
:class:`PromptConfig` template so experiments can change wording without
touching code, and so SFT, GRPO and evaluation render identical prompts.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from recllm_jax.data.catalog import Catalog
from recllm_jax.data.sources import Example

__all__ = [
  "PromptConfig",
  "build_prompt",
  "build_target",
  "build_sft_pair",
  "build_rationale",
  "render_history",
  "count_tokens",
  "extract_titles",
  "TARGET_FORMATS",
]

TARGET_FORMATS = ("direct", "cot")


class _Tokenizer(Protocol):  # the subset of a HF tokenizer used here
  chat_template: Any

  def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

  def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


@dataclasses.dataclass(frozen=True)
class PromptConfig:
  """All prompt wording and layout. Templates are ``str.format`` strings.

  Placeholders: ``user_template``: {profile} {history} {instruction}
  {answer_format}; ``plain_template``: {system} {user};
  ``history_item_template``: {index} {title} {details};
  ``details_template``: {attributes}; ``attribute_template`` and
  ``profile_field_template``: {name} {value}; ``profile_template``:
  {profile}; ``cot_template``: {rationale} {answer}.
  """

  instruction: str = "Based on this history, recommend the item the user is most likely to buy next."
  history_attributes: tuple[str, ...] = ("brand",)
  max_history_tokens: int = 512
  target_format: str = "direct"
  item_delimiter: str = "\n"
  use_chat_template: bool = True
  system_prompt: str | None = None

  direct_answer_format: str = "Reply with the exact title of the item and nothing else."
  cot_answer_format: str = (
    "Think briefly inside <think></think>, then give the exact title of the item inside <answer></answer>."
  )
  profile_template: str = "User profile: {profile}\n\n"
  profile_field_template: str = "{name}: {value}"
  profile_field_separator: str = "; "
  history_header: str = "Purchase history (oldest first):\n"
  history_item_template: str = "{index}. {title}{details}\n"
  details_template: str = " ({attributes})"
  attribute_template: str = "{name}: {value}"
  attribute_separator: str = ", "
  empty_history: str = "The user has no purchase history yet.\n"
  user_template: str = "{profile}{history}\n{instruction} {answer_format}"
  plain_template: str = "{system}{user}\n\nAnswer: "
  cot_template: str = "<think>\n{rationale}\n</think>\n<answer>{answer}</answer>"
  rationale_window: int = 10

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


def count_tokens(text: str, tokenizer: _Tokenizer | None) -> int:
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


def _render_items(item_ids: Sequence[str], catalog: Catalog, cfg: PromptConfig) -> str:
  return "".join(
    cfg.history_item_template.format(
      index=index,
      title=catalog[item_id].title,
      details=_render_details(catalog[item_id].attributes, cfg),
    )
    for index, item_id in enumerate(item_ids, start=1)
  )


def render_history(
  example: Example, catalog: Catalog, tokenizer: _Tokenizer | None, cfg: PromptConfig
) -> tuple[str, int]:
  """Render the history block; returns ``(text, number of items kept)``.

  Keeps the longest suffix (newest items) whose item lines fit in
  ``cfg.max_history_tokens`` tokens (the header is not counted), found by
  binary search since the size grows with the number of items. At least
  the newest item is always kept: a prompt with no history cannot be
  answered, so one long title may exceed the budget.
  """
  history = example.history
  if not history:
    return cfg.empty_history, 0

  def fits(k: int) -> bool:
    return count_tokens(_render_items(history[-k:], catalog, cfg), tokenizer) <= cfg.max_history_tokens

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


def _prompt(example: Example, catalog: Catalog, tokenizer: _Tokenizer | None, cfg: PromptConfig) -> tuple[str, int]:
  history, kept = render_history(example, catalog, tokenizer, cfg)
  answer_format = cfg.cot_answer_format if cfg.target_format == "cot" else cfg.direct_answer_format
  user = cfg.user_template.format(
    profile=_render_profile(example.profile, cfg),
    history=history,
    instruction=cfg.instruction,
    answer_format=answer_format,
  )
  if cfg.use_chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    messages.append({"role": "user", "content": user})
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)), kept
  system = f"{cfg.system_prompt}\n\n" if cfg.system_prompt else ""
  return cfg.plain_template.format(system=system, user=user), kept


def build_prompt(example: Example, catalog: Catalog, tokenizer: _Tokenizer | None, cfg: PromptConfig) -> str:
  """The full prompt text, ending where the model's completion starts.

  Uses the tokenizer's chat template (with the generation prompt) when it
  has one and ``cfg.use_chat_template``; otherwise ``cfg.plain_template``.
  The prompt never depends on the targets, so the same text is used for
  SFT, GRPO rollouts and evaluation.
  """
  return _prompt(example, catalog, tokenizer, cfg)[0]


def build_rationale(
  example: Example, catalog: Catalog, cfg: PromptConfig, *, visible_items: int | None = None
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
  window = cfg.rationale_window if visible_items is None else min(cfg.rationale_window, visible_items)
  recent = example.history[-window:] if window > 0 else ()
  lines: list[str] = []
  if recent:
    lines.append(f'The most recent item is "{catalog[recent[-1]].title}".')
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


def build_target(
  example: Example, catalog: Catalog, cfg: PromptConfig, *, visible_items: int | None = None
) -> str:
  """The completion text (without eos; the data pipeline appends it).

  ``visible_items`` only matters for ``cot`` (see :func:`build_rationale`);
  :func:`build_sft_pair` passes it automatically.
  """
  answer = cfg.item_delimiter.join(catalog[item_id].title for item_id in example.targets)
  if cfg.target_format == "direct":
    return answer
  rationale = build_rationale(example, catalog, cfg, visible_items=visible_items)
  return cfg.cot_template.format(rationale=rationale, answer=answer)


def build_sft_pair(
  example: Example, catalog: Catalog, tokenizer: _Tokenizer | None, cfg: PromptConfig
) -> tuple[str, str]:
  """``(prompt, completion)``; loss is computed on the completion only."""
  prompt, kept = _prompt(example, catalog, tokenizer, cfg)
  return prompt, build_target(example, catalog, cfg, visible_items=kept)


_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_titles(completion: str, cfg: PromptConfig) -> list[str] | None:
  """Inverse of :func:`build_target`: the answered titles, or ``None`` if malformed.

  For ``cot`` the answer must appear inside ``<answer>...</answer>`` after a
  closed ``<think>`` block (a format reward can use ``None``). Titles are
  split on ``cfg.item_delimiter`` and stripped; empty pieces are dropped.
  """
  text = completion
  if cfg.target_format == "cot":
    think_end = text.find("</think>")
    match = _ANSWER_RE.search(text, think_end + len("</think>")) if think_end >= 0 else None
    if match is None:
      return None
    text = match.group(1)
  return [t.strip() for t in text.split(cfg.item_delimiter) if t.strip()]
