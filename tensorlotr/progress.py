"""Progress reporting for long jobs: a callable wrapping an iterable, as tqdm does."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

#: ``progress(items, description, total)`` returns an iterable over ``items``.
Progress = Callable[[Iterable[Any], str, int], Iterable[Any]]


def no_progress(items: Iterable[Any], _desc: str, _total: int) -> Iterable[Any]:
    """Report nothing (the library default)."""
    return items


def tqdm_progress(items: Iterable[Any], desc: str, total: int) -> Iterable[Any]:
    """A tqdm bar on stderr that disappears when done (the CLI's choice)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False)
