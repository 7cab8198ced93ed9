"""``LoTRLinear``: the project's :class:`~tensorlotr.nn.layer.LoTRLayer` as a PEFT ``BaseTunerLayer``.

The forward, the mixed-batch path and ``delta_weight`` are :class:`LoTRLayer`'s; this class
adds what PEFT calls on its layers: ``set_adapter``, ``enable_adapters``, ``merge(safe_merge,
adapter_names)``, ``delete_adapter``, the base layer's ``weight``, ``bias``, ``in_features`` and
``out_features``, and ``get_delta_weight`` (so PEFT's ``convert_to_lora`` works). The cores
``G_l`` (r_out, r_in) live here, in ``lotr_cores``; the factors belong to the tuner.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..nn.layer import DEFAULT_ADAPTER, LoTRFactors, LoTRLayer
from ..nn.targets import dense_weight, quantization, set_dense_weight

__all__ = ["LoTRLinear"]


class LoTRLinear(LoTRLayer, BaseTunerLayer):  # type: ignore[misc]  # PEFT types bias as Tensor, ours may be None
    """A Linear or GPT-2 Conv1D with LoTR adapters, as PEFT's tuner layers are.

    ``y = base(x) + sum_a scale_a * ((x V_a) G_a^T) U_a^T`` over the active adapters ``a``:
    the core ``G_a`` (r_out, r_in) is this layer's (``lotr_cores[a]``), the factors ``U_a``
    (d_out, r_out) and ``V_a`` (d_in, r_in) are the group's, held once by the tuner.

    Examples
    --------
    >>> import torch
    >>> from tensorlotr.nn.layer import LoTRFactors
    >>> linear = torch.nn.Linear(24, 32)
    >>> layer = LoTRLinear(linear, LoTRFactors(32, 24, (4, 2)), scale=2.0)
    >>> layer.weight is linear.weight, (layer.in_features, layer.out_features), layer.active_adapters
    (True, (24, 32), ['default'])
    >>> _ = torch.nn.init.normal_(layer.lotr_cores["default"])
    >>> x = torch.randn(3, 24)
    >>> layer.enable_adapters(False)  # as PeftModel.disable_adapter() does
    >>> torch.equal(layer(x), linear(x))
    True
    >>> layer.enable_adapters(True)
    >>> torch.allclose(layer(x), linear(x) + x @ layer.get_delta_weight("default").T, atol=1e-5)
    True
    """

    #: The per-adapter containers PEFT switches, freezes and deletes by adapter name.
    adapter_layer_names = ("lotr_cores",)
    other_param_names = ("scales",)

    def __init__(
        self,
        base_layer: nn.Module,
        factors: LoTRFactors,
        scale: float,
        dropout: float = 0.0,
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__(base_layer, factors, scale, dropout, adapter_name)
        self.merged_adapters = []

    # --- PEFT's state, under LoTRLayer's names --------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        """The active adapters (PEFT's ``_active_adapter``, as a list)."""
        active = self._active_adapter
        return [active] if isinstance(active, str) else list(active)

    @active_adapters.setter
    def active_adapters(self, names: list[str]) -> None:
        self._active_adapter = list(names)

    @property
    def active(self) -> bool:
        """False while PEFT's adapters are disabled (``PeftModel.disable_adapter()``)."""
        return not self._disable_adapters

    @active.setter
    def active(self, value: bool) -> None:
        self._disable_adapters = not value

    @property
    def in_features(self) -> int:
        return self.d_in

    @property
    def out_features(self) -> int:
        return self.d_out

    # --- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base layer's output plus the active adapters' updates.

        ``adapter_names`` (one per sample, ``"__base__"`` for none) serves a mixed batch, as
        PEFT passes it to its layers during ``model(..., adapter_names=...)``; while an adapter is
        merged it is refused (``ValueError``, PEFT's message). A merged adapter is unmerged while
        adapters are disabled, as in PEFT.
        """
        if self.disable_adapters and self.merged:
            self.unmerge()
        if adapter_names is None:
            return super().forward(x, *args, **kwargs)
        if self.merged:  # the base weight holds the merged updates: no sample could get the base or another adapter
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        self.batch_adapters = list(adapter_names)
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            self.batch_adapters = None

    # --- merging, as PEFT calls it -----------------------------------------------------------
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``scale * U G V^T`` of ``adapter_name``, laid out as the base weight: (d_out, d_in); Conv1D (d_in, d_out)."""
        delta = self.delta_weight(adapter=adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def supports_lora_conversion(self, adapter_name: str = DEFAULT_ADAPTER) -> bool:
        """True: the update is additive, ``W + dW``, so PEFT's ``convert_to_lora`` applies."""
        return True

    @torch.no_grad()
    def _write_update(self, adapter: str, sign: float, check_finite: bool = False) -> None:
        """Add ``sign * delta_weight(adapter)`` to the base weight, in float32 or wider; refuse non-finite sums."""
        base = self.get_base_layer()
        kind = quantization(base)
        if kind is not None:
            warnings.warn(
                f"merging into the {kind} weight of a {type(base).__name__} quantizes the sum again: outputs differ "
                "from the unmerged adapter by that rounding",
                stacklevel=3,
            )
        weight = dense_weight(base)
        work = torch.promote_types(torch.promote_types(weight.dtype, self.lotr_cores[adapter].dtype), torch.float32)
        updated = weight.to(work) + sign * self.delta_weight(work, adapter)
        if check_finite and not torch.isfinite(updated).all():
            raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
        set_dense_weight(base, updated)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:  # type: ignore[override]
        """Add the updates of ``adapter_names`` (default: the active ones) into the base weight.

        With ``safe_merge`` the sum is checked for NaN and inf before it is written, as in PEFT.
        """
        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.lotr_cores:
                self._write_update(name, 1.0, check_finite=safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged update from the base weight again, last merged first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            self._write_update(self.merged_adapters.pop(), -1.0)

    # --- adapters ------------------------------------------------------------------------------
    def delete_adapter(self, adapter_name: str) -> None:
        """Remove ``adapter_name``'s core; if it was active, the other active ones stay so (else the first left is)."""
        was_active = self.active_adapters
        if adapter_name in self.lotr_cores:
            super().delete_adapter(adapter_name)
        if adapter_name not in was_active:  # active here even where it has no core: PEFT sets every layer alike
            return
        still_active = [name for name in was_active if name != adapter_name]
        remaining = sorted(self.lotr_cores.keys())
        if still_active:
            self.set_adapter(still_active)
        elif remaining:
            warnings.warn(
                f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to {remaining[0]}.",
                stacklevel=2,
            )
            self.set_adapter(remaining[0])
        else:
            self.set_adapter([])

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move ``adapter_name``'s core to the base layer's device, keeping its dtype (the factors')."""
        if adapter_name not in self.lotr_cores:
            return
        weight = getattr(self.get_base_layer(), "weight", None)
        target = device if device is not None else getattr(weight, "device", None)
        core = self.lotr_cores[adapter_name]
        if target is not None and not core.is_meta and core.device != torch.device(target):
            self.lotr_cores[adapter_name] = nn.Parameter(core.to(target), requires_grad=core.requires_grad)
