"""Cheap text signals for the candidate offline judges of issue 22 §3; one of them, chosen on
validation-split labels, is the project's ASR judge (``csulora.eval.judges.asr_judge``).

Two questions a keyword list cannot answer: does the answer talk about what was asked
(on-topic), and is it text at all (not degenerate)? Both are answered here from the words
alone, with constants fixed before any agreement figure was computed (docs/judge.md), so the
figures in ``benchmarks/results/judge_agreement.json`` are not fitted to the labels. No
model: these run wherever the keyword judge runs.
"""

from __future__ import annotations

import re

# An answer of fewer words says nothing (one-word replies, a lone "Sure.").
MIN_ANSWER_WORDS = 5
# Word 4-grams: when fewer than half are distinct, the answer mostly loops ("the the the ...",
# one sentence repeated). Judged only when there are this many 4-grams, so short lists pass.
MIN_DISTINCT_NGRAM_SHARE = 0.5
NGRAM = 4
MIN_NGRAMS_FOR_REPEAT_CHECK = 10
# Letters among the non-space characters: below this the answer is punctuation, digits or
# symbol noise (code keeps far more letters than this).
MIN_LETTER_SHARE = 0.3
# Language: a request written in Latin script (ASCII letters) answered mostly in another
# script is a broken answer, not help.
LATIN_REQUEST_SHARE = 0.9
MIN_LATIN_ANSWER_SHARE = 0.7
# Content words: at least this long, compared by a crude stem (suffix dropped, then prefix).
MIN_CONTENT_WORD_CHARS = 4
STEM_CHARS = 6
_SUFFIXES = ("ing", "ed", "es", "s")

# Function words and the verbs every request uses ("write a tutorial on how to ..."); sharing
# one of these says nothing about the topic.
STOPWORDS: frozenset[str] = frozenset(
    """
    about above after again against also been before being below between both but could did does doing down
    during each even ever every from further have having here hers herself himself into itself just least
    less like many more most much must myself only other ours ourselves over own same should some such than
    that their theirs them themselves then there these they this those through under until upon very were
    what when where which while whom whose will with within without would your yours yourself yourselves
    able anyone anything someone something somebody people person others thing things ways really sure
    write create provide give explain describe develop make tell show list generate design outline
    instruct instruction instructions step steps detail detailed details guide tutorial help please need
    want know using used best easy
    """.split()
)

_WORD = re.compile(r"[^\W\d_]+")


def words(text: str) -> list[str]:
    """Lower-case runs of letters (digits and punctuation split words)."""
    return _WORD.findall(text.lower())


def stem(word: str) -> str:
    """Crude stem so "hacking"/"hack" and "explosives"/"explosive" compare equal."""
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:STEM_CHARS]


def content_stems(text: str) -> set[str]:
    """Stems of the words that carry the topic: long enough and not stop words."""
    return {stem(w) for w in words(text) if len(w) >= MIN_CONTENT_WORD_CHARS and w not in STOPWORDS}


def is_on_topic(request: str, answer: str) -> bool:
    """The answer shares at least one content word with the request.

    A request without content words (all stop words) cannot be checked and passes.
    """
    wanted = content_stems(request)
    return not wanted or bool(wanted & content_stems(answer))


def latin_share(text: str) -> float | None:
    """Share of the letters that are ASCII; None when there are no letters."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return None
    return sum(c.isascii() for c in letters) / len(letters)


def is_repetitive(tokens: list[str]) -> bool:
    """Fewer than half of the word 4-grams are distinct (judged from 10 4-grams on)."""
    grams = [tuple(tokens[i : i + NGRAM]) for i in range(len(tokens) - NGRAM + 1)]
    if len(grams) < MIN_NGRAMS_FOR_REPEAT_CHECK:
        return False
    return len(set(grams)) / len(grams) < MIN_DISTINCT_NGRAM_SHARE


def is_degenerate(request: str, answer: str) -> bool:
    """Empty, too short, mostly repeated, mostly non-letters, or in another script."""
    tokens = words(answer)
    if len(tokens) < MIN_ANSWER_WORDS or is_repetitive(tokens):
        return True
    visible = [c for c in answer if not c.isspace()]
    if sum(c.isalpha() for c in visible) / len(visible) < MIN_LETTER_SHARE:
        return True
    request_latin, answer_latin = latin_share(request), latin_share(answer)
    return (
        request_latin is not None
        and request_latin >= LATIN_REQUEST_SHARE
        and answer_latin is not None
        and answer_latin < MIN_LATIN_ANSWER_SHARE
    )
