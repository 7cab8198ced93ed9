"""``x V`` computed once for the layers of a group that read the same input (query and value of one block).

A group's factors hold a :class:`SharedInputProduct`; :func:`share_input_products` hooks each
module that is the parent of two or more of a group's adapted layers, so that the product is
kept while that parent runs and cleared when it returns. The layers are found by their
``is_lotr_layer`` mark and ``factors`` attribute: this module imports no layer type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["SHARE_MIN_ROWS", "SharedInputProduct", "share_input_products"]

#: Sibling layers reuse ``x V`` from this many input rows up; below, the product (a few
#: thousand multiply-adds at one token) costs less than looking it up.
SHARE_MIN_ROWS = 32


class SharedInputProduct:
    """``x V`` of one group, kept while a parent module of two or more of the group's layers runs.

    The parent's forward pre-hook opens the scope and its forward hook (``always_call``) clears
    it, so nothing outlives the parent's forward. Within it, a layer reuses the product when it
    reads the same tensor object, unmodified (version counters), in the same grad and autocast
    mode, as the layer that computed it. The reuse is the same tensor in the same autograd
    graph: gradients from both layers accumulate into it.

    Examples
    --------
    >>> import torch
    >>> x, v = torch.randn(4, 6), torch.randn(6, 2)
    >>> shared = SharedInputProduct()
    >>> shared.enter()  # the parent's forward starts
    >>> first = shared.get(x, ("key",), lambda: x @ v)
    >>> shared.get(x, ("key",), lambda: x @ v) is first  # the sibling layer reuses it
    True
    >>> shared.exit()  # the parent's forward returns: nothing is kept
    >>> shared.entry is None
    True
    """

    def __init__(self) -> None:
        self.depth = 0
        self.entry: tuple[torch.Tensor, tuple[Any, ...], torch.Tensor] | None = None

    def get(self, x: torch.Tensor, key: tuple[Any, ...], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The product for input ``x`` under ``key``, computed by ``compute`` unless held."""
        entry = self.entry
        if entry is not None and entry[0] is x and entry[1] == key:
            return entry[2]
        value = compute()
        self.entry = (x, key, value)
        return value

    def enter(self) -> None:
        """A parent module's forward starts."""
        self.depth += 1

    def exit(self) -> None:
        """A parent module's forward returns; the last one out clears the product."""
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:
            self.entry = None


class _ShareScope:
    """Forward hooks of a parent module that open and clear the shared products of ``shared``."""

    def __init__(self, shared: list[SharedInputProduct]) -> None:
        self.shared = shared

    def enter(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return  # compiled graphs compute each product; the compiler merges common subexpressions
        for product in self.shared:
            product.enter()

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        for product in self.shared:
            product.exit()


def share_input_products(model: nn.Module) -> list[RemovableHandle]:
    """Let the layers of a group that sit in one parent module compute ``x V`` once per forward.

    For each module with two or more LoTR layer children of the same group (query and value of
    one attention block with ``groups="shared"``), hooks open a scope for the group's factors
    while that module runs. Returns the hook handles; remove them to stop sharing.

    Examples
    --------
    A BERT block of hidden size 32 whose ``query`` and ``value`` share one group: their parent,
    the self-attention module, gets a pre-hook and a hook.

    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query", "value"], groups="shared"))
    >>> len(share_input_products(lotr.base_model))  # 2 blocks, 2 hooks each
    4
    """
    by_parent: dict[str, dict[int, list[SharedInputProduct]]] = {}  # by parent, each layer's group's product
    for name, module in model.named_modules():
        if getattr(module, "is_lotr_layer", False):
            factors: Any = module.factors  # a LoTRFactors
            parent = name.rpartition(".")[0]
            by_parent.setdefault(parent, {}).setdefault(id(factors), []).append(factors.shared_input)
    handles = []
    for parent, groups in by_parent.items():
        shared = [products[0] for products in groups.values() if len(products) > 1]
        if shared:
            scope = _ShareScope(shared)
            module = model.get_submodule(parent)
            handles.append(module.register_forward_pre_hook(scope.enter))
            handles.append(module.register_forward_hook(scope.exit, always_call=True))
    return handles
