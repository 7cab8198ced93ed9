"""Register LoTR in PEFT's method tables, so that ``peft_type`` LOTR configs, models and folders resolve to it.

PEFT's public ``register_peft_method`` accepts only the names of its ``PeftType`` enum, so
LoTR writes the three entries it would write (``PEFT_TYPE_TO_CONFIG_MAPPING``,
``PEFT_TYPE_TO_TUNER_MAPPING``, ``PEFT_TYPE_TO_PREFIX_MAPPING``) itself, with the same
uniqueness checks, keyed by :data:`~tensorlotr.peft.config.LOTR`: a ``str`` enum equal to
``"LOTR"``, which PEFT's code compares, hashes, formats and serialises as it does its own members
(huggingface/peft#2634 made PEFT accept ``peft_type`` values outside its enum).
"""

from __future__ import annotations

from typing import Any

from peft import mapping

from .config import LOTR, LoTRPeftConfig
from .tuner import LoTRTuner

__all__ = ["is_registered", "register"]


def _ours(value: object) -> bool:
    """True for a LoTR class or prefix this package (or an earlier import of it) registered."""
    return value == LoTRTuner.prefix or getattr(value, "__module__", "").startswith("tensorlotr.peft")


def register() -> None:
    """Put LoTR in PEFT's tables; idempotent. :mod:`tensorlotr.peft` calls it when imported.

    Raises ``RuntimeError`` when PEFT already has another method named LOTR, or another method
    with LoTR's parameter prefix ``lotr_``.

    Examples
    --------
    >>> from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    >>> register()
    >>> PEFT_TYPE_TO_CONFIG_MAPPING["LOTR"].__name__, is_registered()
    ('LoTRPeftConfig', True)
    """
    tables: tuple[tuple[dict[Any, Any], object], ...] = (  # keyed by PeftType; LOTR is a str enum of its own
        (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, LoTRPeftConfig),
        (mapping.PEFT_TYPE_TO_TUNER_MAPPING, LoTRTuner),
        (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, LoTRTuner.prefix),
    )
    for table, _ in tables:
        current = table.get(LOTR)
        if current is not None and not _ours(current):
            raise RuntimeError(
                f"PEFT already has a method with peft_type {LOTR.value!r} ({current!r}); LoTR cannot register"
            )
    prefixes: dict[Any, str] = mapping.PEFT_TYPE_TO_PREFIX_MAPPING
    clash = [key for key, prefix in prefixes.items() if prefix == LoTRTuner.prefix and key != LOTR]
    if clash:
        raise RuntimeError(f"PEFT method {clash[0]!r} already uses the parameter prefix {LoTRTuner.prefix!r}")
    for table, value in tables:
        table.pop(LOTR, None)  # a refusal placeholder, or an earlier import's classes
        table[LOTR] = value


def is_registered() -> bool:
    """True when PEFT's tables map ``peft_type`` LOTR to this package's config and tuner.

    Examples
    --------
    >>> is_registered()
    True
    """
    configs: dict[Any, type] = mapping.PEFT_TYPE_TO_CONFIG_MAPPING
    tuners: dict[Any, type] = mapping.PEFT_TYPE_TO_TUNER_MAPPING
    return configs.get(LOTR) is LoTRPeftConfig and tuners.get(LOTR) is LoTRTuner
