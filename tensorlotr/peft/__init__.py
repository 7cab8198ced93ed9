"""LoTR as a PEFT method: ``LoTRPeftConfig`` for ``peft.get_peft_model``, TRL and ``transformers.Trainer``.

Importing this package registers LoTR with PEFT (``peft_type`` ``"LOTR"``); ``import tensorlotr``
does it too, lazily, the moment PEFT is imported, so that ``PeftModel.from_pretrained`` and
``AutoPeftModelFor…`` load LoTR adapter folders in a fresh process. It needs a PEFT in
:data:`~tensorlotr.peft.support.PEFT_VERSIONS` (``pip install 'tensorlotr[peft]'``); any other
raises :class:`~tensorlotr.peft.support.UnsupportedPeftVersionError` here, and PEFT's loaders say
the same when they meet a LoTR adapter.

Examples
--------
>>> from tensorlotr.peft import LoTRPeftConfig, is_registered
>>> is_registered()
True
>>> LoTRPeftConfig(rank=(8, 4), target_modules=["q_proj", "v_proj"]).peft_type
<LoTRPeftType.LOTR: 'LOTR'>
"""

from __future__ import annotations

from .support import (
    PEFT_VERSIONS,
    UnsupportedPeftVersionError,
    check_peft_version,
    peft_version_problem,
    register_refusal,
)

_problem = peft_version_problem()
if _problem is not None:
    register_refusal(_problem)
    raise UnsupportedPeftVersionError(_problem)

from .config import LOTR, LoTRPeftConfig, LoTRPeftType  # noqa: E402
from .layer import LoTRLinear  # noqa: E402
from .registration import is_registered, register  # noqa: E402
from .tuner import LoTRTuner  # noqa: E402

register()

__all__ = [
    "LOTR",
    "PEFT_VERSIONS",
    "LoTRLinear",
    "LoTRPeftConfig",
    "LoTRPeftType",
    "LoTRTuner",
    "UnsupportedPeftVersionError",
    "check_peft_version",
    "is_registered",
    "register",
]
