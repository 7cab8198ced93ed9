"""The built-in sentiment task: a small text-classification data set of template sentences.

:func:`read_tsv` lives in :mod:`tensorlotr.io.text`, the one reader of text data files; it is
importable from here, as ``from tensorlotr.data import builtin_sentiment, read_tsv``.
"""

from __future__ import annotations

import itertools
import random

from ..io.text import read_tsv

__all__ = ["builtin_sentiment", "read_tsv"]

_TEMPLATES = [
    "the {noun} was {adj}.",
    "i thought the {noun} was {adj}.",
    "what a {adj} {noun}.",
    "honestly, the {noun} is {adj}.",
    "this {noun} felt {adj} from start to finish.",
    "everyone agreed the {noun} was {adj}.",
]
_NOUNS = ["movie", "film", "story", "acting", "soundtrack", "ending", "script", "cast", "plot", "performance"]
_POSITIVE = [
    "wonderful", "brilliant", "delightful", "moving", "superb", "charming", "excellent", "beautiful",
    "fantastic", "gripping", "hilarious", "touching", "remarkable", "enjoyable", "stunning",
]  # fmt: skip
_NEGATIVE = [
    "terrible", "boring", "awful", "dreadful", "dull", "clumsy", "painful", "horrible",
    "tedious", "pointless", "bland", "annoying", "disappointing", "forgettable", "lifeless",
]  # fmt: skip


def builtin_sentiment(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A small sentiment task, ``(train, test)`` lists of ``(sentence, label)``.

    Template sentences; the test set uses adjectives never seen in training, so accuracy
    measures what the pretrained model knows of sentiment words, not memorisation.
    Labels: 1 positive, 0 negative.

    Examples
    --------
    >>> train, test = builtin_sentiment(seed=0)
    >>> len(train), len(test)
    (1200, 600)
    >>> sentence, label = train[0]
    >>> isinstance(sentence, str), label in (0, 1)
    (True, True)
    """
    rng = random.Random(seed)
    splits: tuple[list[tuple[str, int]], list[tuple[str, int]]] = ([], [])
    for label, adjectives in ((1, _POSITIVE), (0, _NEGATIVE)):
        held_out = set(rng.sample(adjectives, k=len(adjectives) // 3))
        for template, noun, adj in itertools.product(_TEMPLATES, _NOUNS, adjectives):
            splits[adj in held_out].append((template.format(noun=noun, adj=adj), label))
    for split in splits:
        rng.shuffle(split)
    return splits
