"""``modules_to_save``: one module trained in full, as a trainable copy per adapter beside the frozen original."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["ModulesToSaveWrapper", "swap_module"]


def swap_module(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``path`` in ``model``; return the module it replaces.

    Examples
    --------
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> new = torch.nn.Linear(2, 2)
    >>> old = swap_module(model, "0", new)
    >>> model[0] is new and old is not new
    True
    """
    parent_name, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_name)
    previous: nn.Module = getattr(parent, child)
    setattr(parent, child, module)
    return previous


class ModulesToSaveWrapper(nn.Module):
    """The copies of one module of ``modules_to_save``, with the semantics of PEFT's ``ModulesToSaveWrapper``.

    It holds the frozen ``original_module`` and one copy per adapter; the copies are what train.
    The module that runs sits at ``path`` in the base model: the active adapter's copy, or the
    original when that adapter has none or the adapters are off (:meth:`disabled`). So the base
    model keeps its structure and its parameter paths (``classifier.weight`` is the copy's, and
    a plain ``Trainer`` checkpoint keeps it there); the copies not in place wait in
    ``stored_copies``. Forwarding the wrapper runs the module in place.

    A weight the original shares with another module (an ``lm_head`` tied to the embeddings) is
    copied, so training never changes it. For an adapted module (``path`` ends in
    ``.base_layer``) the copies share the frozen weight with the original: only its other
    tensors (a bias) train. Merging changes nothing here (a copy is a whole module already):
    after ``merge_and_unload()`` or ``unload()`` (:meth:`unload`) the active copy stays in the model.

    Examples
    --------
    A head in a ``Sequential``, copied for adapter ``"a"`` and put in place:

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    >>> head = model[1]
    >>> wrapper = ModulesToSaveWrapper(model, "1")
    >>> wrapper.add_adapter("a", "1", place=True)
    >>> model[1] is not head and wrapper.original_module is head and wrapper.active_adapter
    'a'
    >>> with wrapper.disabled():  # the original runs
    ...     model[1] is head
    True
    >>> wrapper.set_adapter(None)  # no copy in place: the original runs, the copy waits
    >>> model[1] is head, list(wrapper.stored_copies)
    (True, ['a'])
    """

    _model: nn.Module

    def __init__(self, model: nn.Module, path: str) -> None:
        super().__init__()
        self.path = path
        self.original_module = model.get_submodule(path)
        self.stored_copies = nn.ModuleDict()  # the copies not in the model, by adapter
        self.names: dict[str, str] = {}  # adapter -> the module its modules_to_save names (path less .base_layer)
        self.active_adapter: str | None = None  # whose copy is in the model; None: the original
        # the base model, not a submodule: the module in place is registered there, and only there
        object.__setattr__(self, "_model", model)

    @property
    def adapters(self) -> list[str]:
        """The adapters with a copy of this module."""
        return list(self.names)

    @property
    def adapted(self) -> bool:
        """True when the module is the base layer of an adapted layer: its copies share its weight."""
        return self.path.endswith(".base_layer")

    def _in_place(self) -> nn.Module:
        return self._model.get_submodule(self.path)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the module in place: the active adapter's copy, or the original."""
        return self._in_place()(*args, **kwargs)

    def add_adapter(self, adapter: str, name: str, *, place: bool) -> None:
        """Give ``adapter`` a copy of the original (``name`` is how its ``modules_to_save`` lists the module).

        With ``place`` the copy goes in the model (the module in place goes into storage), else into storage.
        """
        original = self.original_module
        shared = {id(original.weight): original.weight} if self.adapted else {}
        duplicate = copy.deepcopy(original, shared)
        self.names[adapter] = name
        self.stored_copies[adapter] = duplicate
        if place:
            self.set_adapter(adapter)

    def copy_of(self, adapter: str) -> nn.Module:
        """``adapter``'s copy, in the model or in storage."""
        return self._in_place() if adapter == self.active_adapter else self.stored_copies[adapter]

    def set_adapter(self, adapter: str | None) -> None:
        """Put ``adapter``'s copy in the model; the original where it has none (or for ``None``)."""
        target = adapter if adapter in self.names else None
        if target == self.active_adapter:
            return
        if self.active_adapter is not None:  # take the current copy out into storage
            self.stored_copies[self.active_adapter] = swap_module(self._model, self.path, self.original_module)
        if target is not None:
            swap_module(self._model, self.path, self.stored_copies.pop(target))
        self.active_adapter = target

    def delete_adapter(self, adapter: str) -> None:
        """Drop ``adapter``'s copy (the original goes back in place if it was active)."""
        if adapter == self.active_adapter:
            self.set_adapter(None)
        self.names.pop(adapter, None)
        if adapter in self.stored_copies:
            del self.stored_copies[adapter]

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the original inside the ``with`` block; the active copy is back after it."""
        if self.active_adapter is None:
            yield
            return
        trained = swap_module(self._model, self.path, self.original_module)
        try:
            yield
        finally:
            swap_module(self._model, self.path, trained)

    def unload(self) -> nn.Module:
        """Leave the module in place (the active copy) in the model for good, and return it."""
        self.stored_copies = nn.ModuleDict()
        self.names = {}
        self.active_adapter = None
        return self._in_place()

    def tensor_slots(self, adapter: str) -> dict[str, tuple[nn.Module, str]]:
        """``adapter``'s copy's tensors by plain parameter path (``classifier.weight``), as (owning module, attribute).

        The copy of an adapted module leaves out the frozen weight it shares with the original.
        """
        module, name = self.copy_of(adapter), self.names[adapter]
        tensors = [n for n, _ in module.named_parameters(remove_duplicate=False)]
        tensors += [n for n, _ in module.named_buffers(remove_duplicate=False)]
        slots: dict[str, tuple[nn.Module, str]] = {}
        for tensor_name in tensors:
            if self.adapted and tensor_name == "weight":
                continue  # the frozen base weight, shared with the original
            owner_name, _, attr = tensor_name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            slots[f"{name}.{tensor_name}"] = (owner, attr)
        return slots

    def extra_repr(self) -> str:
        return f"path={self.path!r}, adapters={self.adapters}, active={self.active_adapter!r}"
