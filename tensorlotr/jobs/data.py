"""Small text-classification data: TSV files and the built-in sentiment task."""

from __future__ import annotations

import csv
import itertools
import random
from pathlib import Path

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


def read_tsv(path: str | Path, limit: int | None = None) -> list[tuple[str, int]]:
    """``sentence<TAB>label`` rows of a GLUE-style TSV with a header; labels are ints.

    ``limit`` keeps the first rows only. Errors name the file and line.

    Examples
    --------
    >>> from pathlib import Path
    >>> _ = Path("reviews.tsv").write_text("sentence\\tlabel\\na moving film\\t1\\na dull script\\t0\\n")
    >>> read_tsv("reviews.tsv")
    [('a moving film', 1), ('a dull script', 0)]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    rows: list[tuple[str, int]] = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, None)
            if header is None or len(header) < 2:
                raise ValueError(f"{path}: expected a header 'sentence<TAB>label'")
            for line_no, row in enumerate(reader, start=2):
                if len(row) < 2:
                    raise ValueError(f"{path}:{line_no}: expected 2 tab-separated columns, got {len(row)}")
                try:
                    rows.append((row[0], int(row[1])))
                except ValueError:
                    raise ValueError(f"{path}:{line_no}: label {row[1]!r} is not an integer") from None
                if limit is not None and len(rows) >= limit:
                    break
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows
