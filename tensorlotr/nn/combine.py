"""Weighted combinations of a ``LoTRModel``'s adapters, exact in the Tucker-2 form: PEFT's ``add_weighted_adapter``.

:func:`add_weighted_adapter` is the body of the ``LoTRModel`` method of the same name, which
documents it and shows it at work. Adapters sharing their factors ``U``, ``V`` combine as a
weighted sum of their cores at the same rank (``"linear"``); any adapters on the same groups
combine with their factors side by side and a block-diagonal core (``"cat"``), at rank the
sum of their ranks.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from ..adapter.layout import GroupLayout
from ..core import check_rank
from .layer import DEFAULT_ADAPTER, LoTRFactors, check_adapter_name

if TYPE_CHECKING:
    from .model import LoTRModel


#: The ways to combine adapters exactly (PEFT's ``combination_type``).
COMBINATIONS = ("linear", "cat")


def check_combination(
    adapters: Sequence[str],
    weights: Sequence[float],
    combination_type: str,
    adapter_name: str,
    existing: Collection[str],
) -> tuple[list[str], list[float]]:
    """The adapters and weights of an ``add_weighted_adapter`` call, checked against the ``existing`` adapter names.

    Raises ``ValueError`` for a weight count that differs, a ``combination_type`` other than
    :data:`COMBINATIONS`, an unknown adapter or a new name already taken.

    >>> check_combination(["a", "b"], [1, 0.5], "cat", "mix", {"a", "b"})
    (['a', 'b'], [1.0, 0.5])
    >>> check_combination(["a", "c"], [1, 1], "linear", "mix", {"a", "b"})
    Traceback (most recent call last):
    ValueError: unknown adapters ['c']; adapters: ['a', 'b']
    """
    adapters, weights = list(adapters), [float(w) for w in weights]
    if not adapters or len(adapters) != len(weights):
        raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
    if combination_type not in COMBINATIONS:
        raise ValueError(
            f"combination_type {combination_type!r} is not one of {COMBINATIONS}: LoTR combines adapters exactly, "
            "'linear' for adapters that share their factors (a weighted sum of cores), 'cat' for any adapters on "
            "the same groups (rank: the sum of their ranks)"
        )
    unknown = [a for a in adapters if a not in existing]
    if unknown:
        raise ValueError(f"unknown adapters {unknown}; adapters: {sorted(existing)}")
    if adapter_name in existing:
        raise ValueError(f"adapter {adapter_name!r} already exists")
    return adapters, weights


def check_same_groups(adapters: Sequence[str], groups: Mapping[str, Mapping[str, GroupLayout]]) -> None:
    """Raise ``ValueError`` unless every adapter of ``adapters`` has the groups, of the same modules, of the first.

    ``groups`` maps each adapter to its group layouts.

    >>> layout = GroupLayout(["layer.0.query"], (8, 8), (2, 2), 1.0)
    >>> check_same_groups(["a", "b"], {"a": {"query": layout}, "b": {"query": layout}})
    >>> check_same_groups(["a", "b"], {"a": {"query": layout}, "b": {}})
    Traceback (most recent call last):
    ValueError: adapters 'a' and 'b' adapt different groups of modules
    """
    modules = {group: layout.modules for group, layout in groups[adapters[0]].items()}
    for other in adapters[1:]:
        if {group: layout.modules for group, layout in groups[other].items()} != modules:
            raise ValueError(f"adapters {adapters[0]!r} and {other!r} adapt different groups of modules")


def add_weighted_adapter(
    lotr: LoTRModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "linear",
) -> None:
    """Add to ``lotr`` an adapter of update ``sum_i weights[i] * dW_i``: :meth:`LoTRModel.add_weighted_adapter`.

    Examples
    --------
    Two adapters of ranks 4 and 2 on the two (32, 32) ``query`` layers of a BERT have
    different factors: ``"cat"`` combines them exactly at rank 6, ``"linear"`` refuses them.

    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, get_lotr_model, tucker2
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
    >>> lotr.add_adapter("other", LoTRConfig(rank=2, target_modules=["query"]))
    >>> lotr.load_tucker("query", tucker2(torch.randn(2, 32, 32), rank=4))  # as if trained
    >>> add_weighted_adapter(lotr, ["default", "other"], [1.0, 0.5], "both", combination_type="cat")
    >>> lotr.adapter_groups["both"]["query"].rank
    (6, 6)
    >>> torch.allclose(lotr.tucker("query", "both").to_dense(), lotr.tucker("query").to_dense(), atol=1e-5)
    True
    >>> add_weighted_adapter(lotr, ["default", "other"], [1.0, 0.5], "mix")
    Traceback (most recent call last):
    ValueError: combination_type='linear' combines adapters that share their factors, ...
    """
    adapters, weights = check_combination(adapters, weights, combination_type, adapter_name, lotr.lotr_configs)
    check_adapter_name(adapter_name)
    if any(lotr._has_copies(a) for a in adapters):
        raise ValueError("adapters with modules_to_save have no weighted sum of their full copies; leave them out")
    if any(layer.merged for _, layer in lotr.lotr_layers()):
        raise RuntimeError("unmerge_adapter() before add_weighted_adapter()")
    check_same_groups(adapters, lotr.adapter_groups)
    first = lotr.adapter_groups[adapters[0]]
    factors = {g: [lotr._factors(lotr._factor_keys[a][g]) for a in adapters] for g in first}
    config = copy.deepcopy(lotr.lotr_configs[adapters[0]])
    config.modules_to_save = None
    config.init = "zeros"
    shared: dict[str, LoTRFactors] | None = None
    owner: str | None = None
    if combination_type == "linear":
        for group, found in factors.items():
            for other, theirs in zip(adapters[1:], found[1:], strict=True):
                same = theirs is found[0] or all(
                    a.shape == b.shape and torch.equal(a, b.to(a))
                    for a, b in ((found[0].out_factor, theirs.out_factor), (found[0].in_factor, theirs.in_factor))
                )
                if not same:
                    raise ValueError(
                        f"combination_type='linear' combines adapters that share their factors, but "
                        f"{adapters[0]!r} and {other!r} have different U, V in group {group!r}: their weighted sum "
                        "is no adapter on one pair of factors at that rank; combination_type='cat' combines them "
                        "exactly, at rank the sum of their ranks"
                    )
        keys = {lotr._factor_keys[a][g] for a in adapters for g in first}
        key_owner = {k.partition("--")[0] if "--" in k else DEFAULT_ADAPTER for k in keys}
        if all(len({id(f) for f in found}) == 1 for found in factors.values()) and len(key_owner) == 1:
            shared = {g: found[0] for g, found in factors.items()}  # the very factors: held once
            owner = key_owner.pop()
        groups = {g: GroupLayout(list(x.modules), x.shape, x.rank, x.scale, x.fan_in_fan_out) for g, x in first.items()}
    else:
        groups = {}
        for g, layout in first.items():
            ranks = [lotr.adapter_groups[a][g].rank for a in adapters]
            rank = (sum(r[0] for r in ranks), sum(r[1] for r in ranks))
            check_rank(g, len(layout.modules), layout.shape, rank)
            groups[g] = GroupLayout(list(layout.modules), layout.shape, rank, layout.scale, layout.fan_in_fan_out)
        config.rank_pattern = {**config.rank_pattern, **{g: groups[g].rank for g in groups}}
    lotr._attach(
        adapter_name, config, groups, source=f"adapter {adapter_name!r}", initialise=False, shared=shared,
        factor_owner=owner,
    )  # fmt: skip
    with torch.no_grad():
        for g, layout in groups.items():
            target = lotr._factors(lotr._factor_keys[adapter_name][g])
            if shared is None and combination_type == "linear":
                target.out_factor.copy_(factors[g][0].out_factor)
                target.in_factor.copy_(factors[g][0].in_factor)
            elif shared is None:
                target.out_factor.copy_(torch.cat([f.out_factor.to(target.out_factor) for f in factors[g]], dim=1))
                target.in_factor.copy_(torch.cat([f.in_factor.to(target.in_factor) for f in factors[g]], dim=1))
            for name in layout.modules:
                layer = lotr._layer(name)
                work = torch.promote_types(layer.lotr_cores[adapter_name].dtype, torch.float32)
                parts = [
                    w * layer.scales[a] * layer.lotr_cores[a].to(work) for a, w in zip(adapters, weights, strict=True)
                ]
                core = torch.stack(parts).sum(0) if combination_type == "linear" else torch.block_diag(*parts)  # type: ignore[no-untyped-call]
                layer.lotr_cores[adapter_name].copy_(core / layer.scales[adapter_name])
    lotr._set_trainable(adapter_name, False)
