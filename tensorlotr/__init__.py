"""tensorlotr: low-tensor-rank (LoTR) adapters, a Tucker-2 of a stack of weight updates.

dW_l = U @ G_l @ V.T with U and V shared by all layers of the stack: a stack of L updates
(L, d_out, d_in) is held as U (d_out, r_out), V (d_in, r_in) and L cores G_l (r_out, r_in).

Examples
--------
>>> import numpy as np
>>> import tensorlotr as tlr
>>> B = np.random.default_rng(0).standard_normal((12, 768, 8))  # LoRA up-projections, (L, d_out, r)
>>> A = np.random.default_rng(1).standard_normal((12, 8, 768))  # LoRA down-projections, (L, r, d_in)
>>> exact = tlr.tucker2_lowrank(B, A, scale=2.0)  # the exact rank: at most sum_l r_l = 96
>>> exact.rank, tlr.relative_error_lowrank(exact, B, A, scale=2.0) < 1e-12
((96, 96), True)
>>> tucker = tlr.tucker2_lowrank(B, A, rank=32, scale=2.0)  # never forms a 768 x 768 matrix
>>> tucker.core.shape, tucker.out_factor.shape, tucker.in_factor.shape
((12, 32, 32), (768, 32), (768, 32))
>>> tucker.n_params == 32 * 768 + 32 * 768 + 12 * 32 * 32
True
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .core import Tucker2, relative_error, relative_error_lowrank, tucker2, tucker2_lowrank

if TYPE_CHECKING:  # the names of _LAZY, for type checkers; at run time __getattr__ imports them
    from .adapter import LoTRConfig
    from .jobs.convert import convert_lora
    from .jobs.decompose import decompose
    from .jobs.export import export_lora
    from .jobs.original import convert_original
    from .jobs.zoo import add_to_zoo, compress_zoo
    from .nn import LoTRModel, LoTRTrainer, get_lotr_model

__all__ = [
    "LoTRConfig",
    "LoTRModel",
    "LoTRTrainer",
    "Tucker2",
    "__version__",
    "add_to_zoo",
    "compress_zoo",
    "convert_lora",
    "convert_original",
    "decompose",
    "export_lora",
    "get_lotr_model",
    "relative_error",
    "relative_error_lowrank",
    "tucker2",
    "tucker2_lowrank",
]

#: Public names imported on first use, so that ``import tensorlotr`` (and the math core) load
#: neither torch, the torch bindings nor the jobs: name -> module that defines it.
_LAZY = {
    "LoTRConfig": "tensorlotr.adapter",
    "LoTRModel": "tensorlotr.nn",
    "get_lotr_model": "tensorlotr.nn",
    "LoTRTrainer": "tensorlotr.nn",
    "convert_lora": "tensorlotr.jobs.convert",
    "convert_original": "tensorlotr.jobs.original",
    "export_lora": "tensorlotr.jobs.export",
    "decompose": "tensorlotr.jobs.decompose",
    "compress_zoo": "tensorlotr.jobs.zoo",
    "add_to_zoo": "tensorlotr.jobs.zoo",
}

#: Modules that moved when the folders became the layers: the old, documented path -> the new
#: one. ``import tensorlotr.convert`` still works and gives the very module object of the new
#: path (so ``monkeypatch`` and ``isinstance`` see one module), loaded only when imported.
MOVED_MODULES = {
    "tensorlotr.convert": "tensorlotr.jobs.convert",
    "tensorlotr.decomposition": "tensorlotr.jobs.decompose",
    "tensorlotr.zoo": "tensorlotr.jobs.zoo",
    "tensorlotr.calibration": "tensorlotr.jobs.calibration",
    "tensorlotr.logs": "tensorlotr.jobs.logs",
    "tensorlotr.demo": "tensorlotr.jobs.demo",
    "tensorlotr.data": "tensorlotr.jobs.data",
    "tensorlotr.driver": "tensorlotr.jobs.driver",
    "tensorlotr.heal": "tensorlotr.nn.heal",
    "tensorlotr.optim": "tensorlotr.nn.optim",
    "tensorlotr.io.atomic": "tensorlotr.files.atomic",
    "tensorlotr.io.jsonfile": "tensorlotr.files.jsonfile",
    "tensorlotr.io.hub": "tensorlotr.files.hub",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module path of :data:`MOVED_MODULES` to the module at its new path."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(MOVED_MODULES[spec.name])

    def exec_module(self, module: ModuleType) -> None:
        """The module ran at its new path already."""


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())


def _register_with_peft() -> None:
    """Import :mod:`tensorlotr.peft`, which registers LoTR with PEFT; never let it break ``import peft``."""
    try:
        importlib.import_module("tensorlotr.peft")
    except Exception as exc:  # an unsupported PEFT refuses LoTR adapters itself, with the reason
        if not getattr(exc, "unsupported_peft", False):
            import warnings

            warnings.warn(f"tensorlotr could not register LoTR with PEFT: {exc!r}", RuntimeWarning, stacklevel=2)


class _PeftLoader(importlib.abc.Loader):
    """PEFT's own loader, which registers LoTR right after ``peft`` has run."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _register_with_peft()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)


class _PeftFinder(importlib.abc.MetaPathFinder):
    """Finds ``peft`` as the other finders do and wraps its loader in :class:`_PeftLoader`, so that
    ``import tensorlotr`` alone makes ``PeftModel.from_pretrained`` know ``peft_type`` LOTR, without
    importing PEFT (or torch) before something else does."""

    _searching = False

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "peft" or self._searching:
            return None
        self._searching = True
        try:
            finders = [f for f in sys.meta_path if f is not self and hasattr(f, "find_spec")]
            spec = next((s for f in finders if (s := f.find_spec(fullname, path, target)) is not None), None)
        finally:
            self._searching = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PeftLoader(spec.loader)
        return spec


if not any(isinstance(finder, _PeftFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _PeftFinder())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_peft = sys.modules.get("peft")
if _peft is not None and not getattr(getattr(_peft, "__spec__", None), "_initializing", False):
    _register_with_peft()  # PEFT was imported first: register now
