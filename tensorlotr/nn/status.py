"""The status of a ``LoTRModel``'s adapters, per layer and for the whole model, as PEFT's status API reports it.

:func:`get_layer_status` and :func:`get_model_status` are the bodies of the ``LoTRModel``
methods of the same names, which document them and show them at work; the two dataclasses
carry the fields of PEFT's ``TunerLayerStatus`` and ``TunerModelStatus``.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .targets import quantization

if TYPE_CHECKING:
    from .model import LoTRModel


@dataclass
class TunerLayerStatus:
    """The status of one adapted layer (or copied ``modules_to_save`` module), with the fields of PEFT's dataclass.

    ``requires_grad`` maps each adapter to True, False or ``"irregular"`` (its tensors
    disagree); ``devices`` each adapter to the device types of its tensors.

    Examples
    --------
    >>> status = TunerLayerStatus("layer.0.query", "LoTRLayer", True, ["default"], [], {"default": True},
    ...                           ["default"], {"default": ["cpu"]}, None)
    >>> status.enabled, status.requires_grad
    (True, {'default': True})
    """

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclass
class TunerModelStatus:
    """The status of a model's adapters, with the fields of PEFT's dataclass; ``"irregular"`` where layers disagree.

    Examples
    --------
    >>> status = TunerModelStatus("BertModel", "LoTRModel", {"default": "LOTR"}, 288, 1000, 2, True, ["default"],
    ...                           [], {"default": True}, ["default"], {"default": ["cpu"]}, None)
    >>> status.peft_types, status.num_adapter_layers
    ({'default': 'LOTR'}, 2)
    """

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Literal["irregular"]
    active_adapters: list[str] | Literal["irregular"]
    merged_adapters: list[str] | Literal["irregular"]
    requires_grad: dict[str, bool | Literal["irregular"]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Literal["irregular"] | None


def _agree(values: Sequence[bool | str]) -> bool | Literal["irregular"]:
    """True when every value is True, False when every one is False, else ``"irregular"``, as PEFT reports."""
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def get_layer_status(lotr: LoTRModel) -> list[TunerLayerStatus]:
    """The status of each adapted layer and copied ``modules_to_save`` module: :meth:`LoTRModel.get_layer_status`."""
    statuses = []
    for name, layer in lotr.lotr_layers():
        grads: dict[str, list[bool]] = collections.defaultdict(list)
        devices: dict[str, set[str]] = collections.defaultdict(set)
        for adapter, core in layer.lotr_cores.items():
            factors = layer.factors_of(adapter)
            for tensor in (core, factors.out_factor, factors.in_factor):
                grads[adapter].append(tensor.requires_grad)
                devices[adapter].add(tensor.device.type)
        statuses.append(
            TunerLayerStatus(
                name=name,
                module_type=type(layer).__name__,
                enabled=bool(layer.active),
                active_adapters=list(layer.active_adapters),
                merged_adapters=list(layer.merged_adapters),
                requires_grad={a: _agree(v) for a, v in grads.items()},
                available_adapters=sorted(layer.lotr_cores),
                devices={a: sorted(d) for a, d in devices.items()},
                quantization_backend=quantization(layer.base_layer),
            )
        )
    for wrapper in lotr._wrappers():
        grads = collections.defaultdict(list)
        devices = collections.defaultdict(set)
        for adapter in wrapper.adapters:
            for owner, attr in wrapper.tensor_slots(adapter).values():
                tensor = getattr(owner, attr)
                grads[adapter].append(tensor.requires_grad)
                devices[adapter].add(tensor.device.type)
        placed = lotr._in_place
        active = [placed] if placed in wrapper.adapters and placed in lotr._active else []
        statuses.append(
            TunerLayerStatus(
                name=wrapper.path.removesuffix(".base_layer"),
                module_type=type(wrapper).__name__,
                enabled=lotr._enabled,
                active_adapters=active,
                merged_adapters=[],
                requires_grad={a: _agree(v) for a, v in grads.items()},
                available_adapters=sorted(wrapper.adapters),
                devices={a: sorted(d) for a, d in devices.items()},
                quantization_backend=None,
            )
        )
    return statuses


def get_model_status(lotr: LoTRModel) -> TunerModelStatus:
    """The status of the model's adapters; see :meth:`LoTRModel.get_model_status`."""
    layers = lotr.get_layer_status()
    trainable, total = lotr.get_nb_trainable_parameters()
    enabled = {status.enabled for status in layers}
    actives = {tuple(status.active_adapters) for status in layers if status.module_type != "ModulesToSaveWrapper"}
    merged_all = sorted({a for status in layers for a in status.merged_adapters})
    irregular_merge = any(
        set(merged_all) & (set(status.available_adapters) - set(status.merged_adapters))
        for status in layers
        if status.module_type != "ModulesToSaveWrapper"
    )
    grads: dict[str, list[bool | str]] = collections.defaultdict(list)
    devices: dict[str, set[str]] = collections.defaultdict(set)
    for status in layers:
        for adapter, value in status.requires_grad.items():
            grads[adapter].append(value)
        for adapter, kinds in status.devices.items():
            devices[adapter].update(kinds)
    backends = {status.quantization_backend for status in layers if status.module_type != "ModulesToSaveWrapper"}
    return TunerModelStatus(
        base_model_type=type(lotr.base_model).__name__, adapter_model_type=type(lotr).__name__,
        peft_types={name: "LOTR" for name in lotr.lotr_configs}, trainable_params=trainable, total_params=total,
        num_adapter_layers=len(layers), enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else ([] if not actives else "irregular"),
        merged_adapters="irregular" if irregular_merge else merged_all,
        requires_grad={a: _agree(v) for a, v in grads.items()},
        available_adapters=sorted({a for status in layers for a in status.available_adapters}),
        devices={a: sorted(d) for a, d in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else ("irregular" if backends else None),
    )  # fmt: skip
