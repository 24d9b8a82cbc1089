"""When two prompts count as the same request: exact and near-duplicate overlap.

Both act on :func:`csulora.eval.prompts.normalise_prompt` text (lowercase, punctuation
dropped, whitespace collapsed). *Exact*: equal normalised text. *Near-duplicate*
(:func:`near_duplicate`), any of:

- one normalised text appears, whole words, inside the other ("rob a bank" inside
  "provide instructions on how to rob a bank");
- the Jaccard overlap of their word sets is above ``WORD_JACCARD`` (0.6);
- the Jaccard overlap of their *content* words (the words left after dropping
  ``FRAMING_WORDS``: function words and the verbs that frame a request, such as
  "describe", "give", "step") is at least ``CONTENT_JACCARD`` (0.5), both sets non-empty.

The first two alone miss rephrasings of one goal ("Describe how to rob a bank" /
"Provide instructions on how to rob a bank" share 0.56 of their words); the content-word
test catches them, and errs towards calling two prompts the same: a prompt dropped for
a false match costs one prompt, a missed match lets a scored prompt echo a training or
calibration prompt. The second harmful source (``eval/data/objectives.jsonl``,
docs/second_source.md) is built with this rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from csulora.eval.prompts import Prompt, normalise_prompt

WORD_JACCARD = 0.6  # strictly above
CONTENT_JACCARD = 0.5  # at least

# Function words and the words that frame a request rather than say what it asks for.
FRAMING_WORDS = frozenset(
    """
    a an the and or but if then so to of in on at by for with from into onto about as
    is are was were be been being am do does did doing have has had
    i me my myself we our you your he she it its they them their his her
    this that these those there here what which who whom whose when where why how
    can could would should will shall may might must not no yes
    some any all each every more most very just also only than too s t don please
    give provide write describe explain tell create list show make generate outline
    develop draft teach instruct instructions instruction step steps detailed detail
    guide tutorial way ways best someone one
    """.split()
)


@dataclass(frozen=True)
class _Shape:
    """What the rule compares, computed once per prompt."""

    padded: str  # normalised text with a space either side, for whole-word containment
    words: frozenset[str]
    content: frozenset[str]


def _shape(text: str) -> _Shape:
    norm = normalise_prompt(text)
    all_words = frozenset(norm.split())
    return _Shape(f" {norm} ", all_words, all_words - FRAMING_WORDS)


def content_words(text: str) -> frozenset[str]:
    """The normalised words that say what is asked (``FRAMING_WORDS`` removed)."""
    return _shape(text).content


def jaccard(a: Iterable[str], b: Iterable[str]) -> float:
    """|a ∩ b| / |a ∪ b|; 0.0 when both are empty."""
    sa, sb = set(a), set(b)
    union = sa | sb
    return len(sa & sb) / len(union) if union else 0.0


def _same(a: _Shape, b: _Shape) -> bool:
    if a.padded in b.padded or b.padded in a.padded:
        return True  # equal, or one inside the other
    if jaccard(a.words, b.words) > WORD_JACCARD:
        return True
    return bool(a.content and b.content) and jaccard(a.content, b.content) >= CONTENT_JACCARD


def near_duplicate(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` are the same request by the module's rule (exact included)."""
    return _same(_shape(a), _shape(b))


class OverlapIndex:
    """Prompts to test new texts against, their shapes computed once."""

    def __init__(self, prompts: Iterable[Prompt]):
        self._entries = [(p, _shape(p.text)) for p in prompts]

    def first_match(self, text: str) -> Prompt | None:
        """The first indexed prompt that ``text`` near-duplicates (exact included), or None."""
        shape = _shape(text)
        return next((p for p, other in self._entries if _same(shape, other)), None)

    def add(self, prompt: Prompt) -> None:
        self._entries.append((prompt, _shape(prompt.text)))
