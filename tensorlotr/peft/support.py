"""Which PEFT versions LoTR supports as a PEFT method, and the clear failure of the others.

LoTR registers a ``peft_type`` that is not in PEFT's ``PeftType`` enum. PEFT 0.21 is the first
release whose adapter state dicts are selected, renamed and loaded by the tuner class of a
method (``BaseTuner._get_adapter_state_dict`` and friends) rather than by a hard-coded list of
PEFT's own methods, so a method registered from outside saves and loads like LoRA; earlier
versions refuse to save it (``Unknown PEFT type passed: LOTR``). The upper bound is the next
minor release, not yet tested.

This module imports neither torch nor PEFT: it reads PEFT's version from its installed
metadata, so that an unsupported PEFT is reported before anything of it is used.
"""

from __future__ import annotations

import importlib.metadata
import sys
from typing import Any, NoReturn

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__all__ = [
    "PEFT_VERSIONS",
    "UnsupportedPeftVersionError",
    "check_peft_version",
    "peft_version",
    "peft_version_problem",
    "register_refusal",
]

#: The PEFT versions LoTR works with as a PEFT method (the ``tensorlotr[peft]`` extra pins the same).
PEFT_VERSIONS = ">=0.21.0,<0.22"


class UnsupportedPeftVersionError(ImportError):
    """The installed PEFT is outside :data:`PEFT_VERSIONS` (or missing): LoTR cannot register as a PEFT method.

    Examples
    --------
    >>> error = UnsupportedPeftVersionError("peft 0.17.1 is installed")
    >>> isinstance(error, ImportError), error.unsupported_peft
    (True, True)
    """

    #: Lets :mod:`tensorlotr`'s import hook tell this refusal from other import errors.
    unsupported_peft = True


def peft_version() -> str | None:
    """The installed PEFT's version (the imported module's, if imported), or None when PEFT is not installed.

    Examples
    --------
    >>> peft_version() is None or peft_version()[0].isdigit()
    True
    """
    module = sys.modules.get("peft")
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version("peft")
    except importlib.metadata.PackageNotFoundError:
        return None


def peft_version_problem(version: str | None = None) -> str | None:
    """Why PEFT ``version`` (default: the installed one) cannot host LoTR, or None when it can.

    Development releases count as the release they precede (``0.21.3.dev0`` is supported,
    ``0.22.0.dev0`` is not).

    Examples
    --------
    >>> peft_version_problem("0.21.2") is None
    True
    >>> print(peft_version_problem("0.17.1"))
    tensorlotr's LoTR PEFT method needs peft>=0.21.0,<0.22, but peft 0.17.1 is installed: pip install 'tensorlotr[peft]'
    """
    version = peft_version() if version is None else version
    if version is None:
        return (
            f"tensorlotr's LoTR PEFT method needs peft{PEFT_VERSIONS}, which is not installed: "
            "pip install 'tensorlotr[peft]'"
        )
    if SpecifierSet(PEFT_VERSIONS).contains(Version(version), prereleases=True):
        return None
    return (
        f"tensorlotr's LoTR PEFT method needs peft{PEFT_VERSIONS}, but peft {version} is installed: "
        "pip install 'tensorlotr[peft]'"
    )


def check_peft_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedPeftVersionError` unless PEFT ``version`` (default: the installed one) is supported.

    Examples
    --------
    >>> check_peft_version("0.21.0")
    >>> check_peft_version("0.22.0")
    Traceback (most recent call last):
    ...
    tensorlotr.peft.support.UnsupportedPeftVersionError: tensorlotr's LoTR PEFT method needs peft>=0.21.0,<0.22, ...
    """
    problem = peft_version_problem(version)
    if problem is not None:
        raise UnsupportedPeftVersionError(problem)


class _Unsupported:
    """Stands for LoTR in the tables of an unsupported PEFT, so that loading a LoTR adapter says why it cannot."""

    problem = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise UnsupportedPeftVersionError(f"this adapter is a LoTR adapter (peft_type LOTR); {self.problem}")

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise UnsupportedPeftVersionError(f"this adapter is a LoTR adapter (peft_type LOTR); {cls.problem}")

    from_peft_type = from_pretrained


def register_refusal(problem: str) -> None:
    """Make an unsupported, imported PEFT refuse LoTR adapters with ``problem`` rather than a ``KeyError``.

    Does nothing when PEFT is not imported, or when its tables already hold a LoTR method.

    Examples
    --------
    >>> register_refusal("peft 0.17.1 is installed")  # a no-op here: the PEFT in use is supported
    """
    mapping = sys.modules.get("peft.mapping")
    table = getattr(mapping, "PEFT_TYPE_TO_CONFIG_MAPPING", None)
    if not isinstance(table, dict) or peft_version_problem() is None:
        return
    if "LOTR" not in table or getattr(table["LOTR"], "__module__", "") == __name__:
        table["LOTR"] = type("UnsupportedLoTRConfig", (_Unsupported,), {"problem": problem})
