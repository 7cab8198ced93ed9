"""Progress reporting for long jobs: a callable wrapping an iterable, as tqdm does."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeVar

_T = TypeVar("_T")


class Progress(Protocol):
    """``progress(items, description, total)`` returns an iterable over ``items``, in order.

    ``total`` is the number of items, or None when it is not known. Any function of that shape
    is one: :func:`no_progress`, :func:`tqdm_progress`, or a caller's own.

    Examples
    --------
    >>> def report(items: Iterable[_T], desc: str, total: int | None) -> Iterable[_T]:
    ...     print(f"{desc}: {total} items")
    ...     return items
    >>> progress: Progress = report
    >>> list(progress(range(2), "layers", 2))
    layers: 2 items
    [0, 1]
    """

    def __call__(self, items: Iterable[_T], desc: str, total: int | None, /) -> Iterable[_T]:
        """Iterate over ``items`` (``total`` of them), reporting under ``desc``."""


def no_progress(items: Iterable[_T], _desc: str, _total: int | None) -> Iterable[_T]:
    """Report nothing (the library default).

    >>> list(no_progress(range(3), "layers", 3))
    [0, 1, 2]
    """
    return items


def tqdm_progress(items: Iterable[_T], desc: str, total: int | None) -> Iterable[_T]:
    """A tqdm bar on stderr that disappears when done (the CLI's choice).

    >>> sum(tqdm_progress(range(4), "groups", 4))
    6
    """
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, leave=False)
