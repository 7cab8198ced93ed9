"""``LoTRTuner``: LoTR as a PEFT ``BaseTuner``, the shared factors of each group held once at tuner level.

PEFT matches the targets (``target_modules``, ``exclude_modules``, ``layers_to_transform``,
``"all-linear"``, ``modules_to_save``) with its own rules, so a config adapts the modules a
``LoraConfig`` with the same fields adapts. Before any layer is replaced, the matched modules
are stacked into groups (:func:`tensorlotr.nn.targets.build_groups`) and each group gets its
factors ``U`` (d_out, r_out) and ``V`` (d_in, r_in) in ``lotr_factors[adapter][group]``, as
PEFT's VeRA keeps its shared matrices on the tuner; each layer then gets its core.

The tuner keeps the factors' trainability in step with their cores: an adapter's factors
train exactly when its cores do (``set_adapter``, ``inference_mode``, ``disable_adapter()``,
``set_requires_grad``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..adapter import DEFAULT_TARGETS, LoTRConfig
from ..adapter.groups import is_conv1d
from ..adapter.layout import GroupLayout
from ..core import check_rank, tucker2
from ..io.peft_lotr import layout_groups
from ..nn.combine import check_combination, check_same_groups
from ..nn.layer import BASE_ADAPTER, LoTRFactors, check_adapter_name
from ..nn.sharing import share_input_products
from ..nn.targets import build_groups, dense_weight, is_supported, unwrap, weight_shape
from .config import LoTRPeftConfig
from .layer import LoTRLinear

__all__ = ["FACTORS", "LoTRTuner"]

#: The tuner attribute that holds the factors: ``lotr_factors[adapter][group]`` is a :class:`LoTRFactors`.
FACTORS = "lotr_factors"


def _adapter_names_hook(module: nn.Module, args: Any, kwargs: dict[str, Any], adapter_names: list[str]) -> Any:
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class LoTRTuner(BaseTuner):
    """LoTR adapters on a model, as a PEFT tuner: what ``PeftModel.base_model`` is for a :class:`LoTRPeftConfig`.

    Build it through ``peft.get_peft_model(model, LoTRPeftConfig(...))`` (after ``import
    tensorlotr``); PEFT then calls its methods: ``add_adapter``, ``set_adapter``,
    ``delete_adapter``, ``merge_and_unload``, ``disable_adapter_layers``. Beyond PEFT's
    ``BaseTuner`` it has :meth:`add_weighted_adapter`, exact for LoTR adapters.

    Attributes
    ----------
    lotr_factors : nn.ModuleDict
        ``lotr_factors[adapter][group]``: the group's :class:`~tensorlotr.nn.layer.LoTRFactors`,
        ``out_factor`` U (d_out, r_out) and ``in_factor`` V (d_in, r_in); saved once per group as
        ``base_model.lotr_factors.<group>.out_factor``.
    lotr_groups : dict of str to dict of str to GroupLayout
        ``lotr_groups[adapter][group]``: its modules, shape, rank and scale.

    Examples
    --------
    A 2-layer Llama of hidden size 32: the ``q_proj`` of both layers form one group with
    ``U`` (32, 4), ``V`` (32, 4), and each layer has a (4, 4) core.

    >>> import torch, tensorlotr
    >>> from peft import get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from tensorlotr.peft import LoTRPeftConfig
    >>> llama = LlamaForCausalLM(LlamaConfig(
    ...     vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4
    ... ))
    >>> model = get_peft_model(llama, LoTRPeftConfig(rank=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    >>> type(model.base_model).__name__, sorted(model.base_model.lotr_groups["default"])
    ('LoTRTuner', ['q_proj'])
    >>> tuple(model.base_model.lotr_factors["default"]["q_proj"].out_factor.shape)
    (32, 4)
    >>> model.get_nb_trainable_parameters()  # 32*4 + 32*4 factors, once, + 2 cores of 4*4
    (288, 20416)
    """

    prefix: str = "lotr_"
    tuner_layer_cls = LoTRLinear
    target_module_mapping = DEFAULT_TARGETS
    #: The factors live on the tuner, so ``inject_adapter_in_model`` (and with it transformers'
    #: ``model.load_adapter``) cannot host LoTR; ``PeftModel`` can.
    uses_shared_state: bool = True

    # --- state -------------------------------------------------------------------------------
    def _ensure_state(self) -> None:
        if FACTORS not in self._modules:
            self.lotr_factors = nn.ModuleDict()
            self.lotr_groups: dict[str, dict[str, GroupLayout]] = {}
            self._planned: dict[str, tuple[LoTRFactors, float]] = {}
            self._injecting: str | None = None
            self._sharing_hooks: list[Any] = []

    def _config(self, adapter: str) -> LoTRPeftConfig:
        return cast(LoTRPeftConfig, self.peft_config[adapter])

    def _factors(self, adapter: str, group: str) -> LoTRFactors:
        return cast(LoTRFactors, cast(nn.ModuleDict, self.lotr_factors[adapter])[group])

    def _forget(self, adapter: str) -> None:
        """Drop ``adapter``'s factors and groups."""
        if adapter in self.lotr_factors:
            del self.lotr_factors[adapter]
        self.lotr_groups.pop(adapter, None)

    def _layers(self) -> Iterator[LoTRLinear]:
        for module in self.model.modules():
            if isinstance(module, LoTRLinear):
                yield module

    def _reshare(self) -> None:
        """(Re)install the hooks that let sibling layers of a group compute ``x V`` once."""
        for handle in self._sharing_hooks:
            handle.remove()
        self._sharing_hooks = share_input_products(self.model)

    def _sync_factor_grads(self) -> None:
        """Each adapter's factors train exactly when any of its cores does."""
        training: dict[str, bool] = {}
        for layer in self._layers():
            for name, core in layer.lotr_cores.items():
                training[name] = training.get(name, False) or core.requires_grad
        for adapter, groups in self.lotr_factors.items():
            groups.requires_grad_(training.get(adapter, False))

    # --- injection ---------------------------------------------------------------------------
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Plan the groups of ``adapter_name``, make their factors, then let PEFT put a layer on each target."""
        if state_dict is not None:
            raise ValueError(
                "LoTR adapters are injected from their config (their groups stack the matched modules); "
                "a state_dict cannot stand for the config"
            )
        self._ensure_state()
        check_adapter_name(adapter_name)
        self._injecting = adapter_name
        try:
            super().inject_adapter(
                model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
            )
        except Exception:
            if not any(adapter_name in layer.lotr_cores for layer in self._layers()):
                self._forget(adapter_name)
            raise
        finally:
            self._injecting = None
            self._planned = {}
        self._reshare()
        self._sync_factor_grads()

    def _prepare_adapter_config(self, config: PeftConfig, model_config: dict[str, Any]) -> PeftConfig:
        peft_config = cast(LoTRPeftConfig, config)
        if peft_config.target_modules is None and isinstance(peft_config.groups, dict):
            peft_config.target_modules = [p for patterns in peft_config.groups.values() for p in patterns]
        if peft_config.target_modules is None:
            targets = self.target_module_mapping.get(str(model_config.get("model_type")))
            if targets is None:
                raise ValueError("Please specify `target_modules` in `peft_config`")
            peft_config.target_modules = list(targets)
        return peft_config

    @staticmethod
    def _check_target_module_exists(peft_config: PeftConfig, key: str) -> Any:
        """PEFT's matching of ``target_modules``; with a ``lotr_layout``, exactly the modules of its groups."""
        layout = getattr(peft_config, "lotr_layout", None)
        if layout is not None:
            return any(key in group.modules for group in layout_groups(layout).values())
        return check_target_module_exists(peft_config, key)

    def _prepare_model(self, config: PeftConfig, model: nn.Module) -> None:
        """Match the targets as PEFT will, stack them into groups and make each group's factors.

        Runs before any layer is replaced, so a rank a group cannot take, or a target that is not
        a Linear or Conv1D, is refused with the model untouched. A config with a ``lotr_layout``
        (an adapter ``LoTRModel`` saved) gets exactly those groups, ranks and scales.
        """
        adapter = self._injecting
        assert adapter is not None, "_prepare_model runs inside inject_adapter"
        peft_config = cast(LoTRPeftConfig, _maybe_include_all_linear_layers(config, model))
        adapted = [f"{name}." for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
        names = []
        for key, module in model.named_modules():
            if not key or any(key.startswith(prefix) for prefix in adapted):
                continue
            if not self._check_target_module_exists(peft_config, key):  # no match, or excluded
                continue
            if not is_supported(unwrap(module)):
                raise TypeError(
                    f"Target module {key!r} ({type(unwrap(module)).__name__}) is not supported: LoTR adapts "
                    "torch.nn.Linear (bitsandbytes 4-bit and 8-bit linears included) and transformers' Conv1D"
                )
            names.append(key)
        if not names:
            return  # PEFT's matching raises its own error
        lotr_config = peft_config._lotr_config()
        layouts = {}
        if peft_config.lotr_layout is not None:
            layouts = self._saved_layout(model, peft_config.lotr_layout)
        for group in [] if layouts else build_groups(model, names, lotr_config):
            rank = lotr_config.rank_of(group.name, group.modules)
            check_rank(group.name, len(group.modules), group.shape, rank)
            first = unwrap(model.get_submodule(group.modules[0]))
            layouts[group.name] = GroupLayout(
                list(group.modules),
                group.shape,
                rank,
                lotr_config.scale_of(group.name, group.modules),
                is_conv1d(first),
            )
        factors = {name: self._new_factors(model, layout, lotr_config) for name, layout in layouts.items()}
        self.lotr_factors[adapter] = nn.ModuleDict(factors)
        self.lotr_groups[adapter] = layouts
        self._planned = {
            module: (factors[name], layout.scale) for name, layout in layouts.items() for module in layout.modules
        }

    @staticmethod
    def _saved_layout(model: nn.Module, layout: dict[str, Any]) -> dict[str, GroupLayout]:
        """The groups of a saved ``lotr_layout``, checked against ``model``: each module there, of its group's shape."""
        groups = layout_groups(layout)
        modules = dict(model.named_modules())
        for name, group in groups.items():
            for path in group.modules:
                if path not in modules:
                    raise ValueError(f"the adapter adapts module {path!r} (group {name!r}), which the model lacks")
                if weight_shape(unwrap(modules[path])) != tuple(group.shape):
                    d_out, d_in = weight_shape(unwrap(modules[path]))
                    raise ValueError(
                        f"the adapter expects module {path!r} of shape {group.shape[0]}x{group.shape[1]} "
                        f"(d_out x d_in), but the model's is {d_out}x{d_in}"
                    )
        return groups

    def _new_factors(self, model: nn.Module, layout: GroupLayout, config: LoTRConfig) -> LoTRFactors:
        """A group's factors, on its first module's device, initialised as ``config.init`` says."""
        weight = cast(torch.Tensor, unwrap(model.get_submodule(layout.modules[0])).weight)
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        if config.adapter_dtype is not None:
            dtype = getattr(torch, config.adapter_dtype)
        factors = LoTRFactors(*layout.shape, layout.rank, dtype=dtype)
        if factors.out_factor.is_meta:  # low_cpu_mem_usage: the saved factors will be assigned
            return factors
        factors.to(weight.device)
        if config.init == "normal":
            factors.reset_normal()
        elif config.init == "svd":
            weights = []
            for name in layout.modules:
                module = unwrap(model.get_submodule(name))
                if cast(torch.Tensor, module.weight).is_meta:
                    raise ValueError(
                        f"init='svd' decomposes the pretrained weights, but {name!r} is on the meta device; "
                        "load the base weights first, or use init='zeros'"
                    )
                weights.append(dense_weight(module).detach())
            decomposition = tucker2(torch.stack(weights).to(torch.float64), layout.rank)
            with torch.no_grad():
                r_out, r_in = decomposition.rank
                factors.out_factor[:, :r_out] = decomposition.out_factor.to(factors.out_factor)
                factors.in_factor[:, :r_in] = decomposition.in_factor.to(factors.in_factor)
        return factors

    def _create_and_replace(
        self,
        peft_config: PeftConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        if parameter_name is not None:
            raise ValueError("LoTR adapts modules (target_modules), not parameters (target_parameters)")
        if current_key not in self._planned:
            raise RuntimeError(f"module {current_key!r} matched but is in no LoTR group; please report this")
        factors, scale = self._planned[current_key]
        if isinstance(target, LoTRLinear):
            target.add_adapter(adapter_name, factors, scale)
            return
        dropout = cast(LoTRPeftConfig, peft_config).dropout
        layer = LoTRLinear(target, factors, scale, dropout=dropout, adapter_name=adapter_name)
        if adapter_name not in self.active_adapters:
            layer.requires_grad_(False)  # another adapter is being added: it is not trainable yet
        self._replace_module(parent, target_name, layer, target)

    # --- PEFT's switches, with the factors following their cores --------------------------------
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._sync_factor_grads()

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._sync_factor_grads()

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled=enabled)
        self._sync_factor_grads()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._forget(adapter_name)
        for name, module in list(self.model.named_modules()):
            if isinstance(module, LoTRLinear) and not module.lotr_cores:  # it held only the deleted adapter
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, module.base_layer)
        self._reshare()
        self._sync_factor_grads()

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> Any:  # PEFT's annotation says None; it returns the unloaded model
        for handle in self._sharing_hooks:
            handle.remove()
        self._sharing_hooks = []
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """``autocast_adapter_dtype=False`` keeps the adapter in its base layers' dtype, as PEFT does.

        By default (and whenever ``adapter_dtype`` is set) the factors and cores keep the dtype
        they were made in, float32 unless said otherwise; they always share one dtype.
        """
        if autocast_adapter_dtype or self._config(adapter_name).adapter_dtype is not None:
            return
        for group, layout in self.lotr_groups.get(adapter_name, {}).items():
            dtype = cast(torch.Tensor, unwrap(self.model.get_submodule(layout.modules[0])).weight).dtype
            if not dtype.is_floating_point:
                continue  # a quantized base: keep float32
            self._factors(adapter_name, group).to(dtype)
            for name in layout.modules:
                cores = cast(LoTRLinear, self.model.get_submodule(name)).lotr_cores
                core = cores[adapter_name]
                cores[adapter_name] = nn.Parameter(core.detach().to(dtype), requires_grad=core.requires_grad)

    # --- mixed batches ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """``model(..., adapter_names=names)``: sample ``i`` gets adapter ``names[i]`` (``"__base__"``: none)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = {name for layer in self._layers() for name in layer.lotr_cores}
        unknown = sorted({name for name in adapter_names if name != BASE_ADAPTER} - known)
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
        names = list(adapter_names)
        beams = kwargs.get("num_beams")
        expanded = [name for name in names for _ in range(beams)] if isinstance(beams, int) and beams > 1 else names
        handles = []
        for module in self.model.modules():
            if isinstance(module, (LoTRLinear, AuxiliaryTrainingWrapper)):
                hook = functools.partial(_adapter_names_hook, adapter_names=expanded)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        seq2seq = getattr(getattr(self.model, "config", None), "is_encoder_decoder", False)
        if seq2seq and expanded is not names:  # the encoder of a seq2seq model sees each sample once, not per beam
            encoder = self.model.get_encoder()
            for module in encoder.modules():
                if isinstance(module, (LoTRLinear, AuxiliaryTrainingWrapper)):
                    hook = functools.partial(_adapter_names_hook, adapter_names=names)
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # --- state dicts: the factors are saved without the adapter name ------------------------------
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """``base_model.lotr_factors.<adapter>.<group>.out_factor`` -> ``base_model.lotr_factors.<group>.out_factor``.

        Cores follow PEFT's rule (``….q_proj.lotr_cores.<adapter>`` -> ``….q_proj.lotr_cores``).
        Loading inverts this very mapping, so what is saved loads.
        """
        marker = f"{FACTORS}.{adapter_name}."
        head, found, tail = key.partition(marker)
        if found and (not head or head.endswith(".")):
            return f"{head}{FACTORS}.{tail}"
        return super()._remove_adapter_name_from_key(key, adapter_name)

    # --- combining adapters ------------------------------------------------------------------------
    def add_weighted_adapter(
        self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str, combination_type: str = "linear"
    ) -> None:
        """Add adapter ``adapter_name`` whose update is ``sum_i weights[i] * dW_i``, exactly.

        ``combination_type="linear"``: for adapters that share their factors (equal ``U``, ``V``
        in every group: the cheap, exact case of the Tucker-2 form), the new adapter keeps those
        factors and its core is ``sum_i w_i s_i G_i / s``, at the same rank. ``"cat"``: for any
        adapters on the same groups, the factors side by side, ``[U_1 … U_n]`` and
        ``[V_1 … V_n]``, and a block-diagonal core; exact too, at rank the sum of the ranks.
        Adapters with different factors are refused by ``"linear"``, with the reason. The new
        adapter is frozen, as PEFT's LoRA makes it; ``set_adapter`` activates it.

        Examples
        --------
        See the ``add_weighted_adapter`` section of ``docs/peft.md``; the case of equal
        factors, on a :class:`LoTRTuner` ``tuner``::

            tuner.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix")  # 0.5 dW_a + 0.5 dW_b
        """
        adapters, weights = check_combination(adapters, weights, combination_type, adapter_name, self.peft_config)
        if any(self._config(a).modules_to_save for a in adapters):
            raise ValueError("adapters with modules_to_save have no weighted sum of their full copies; leave them out")
        check_same_groups(adapters, self.lotr_groups)
        groups = self.lotr_groups[adapters[0]]
        if combination_type == "linear":
            self._check_shared_factors(adapters)
        config = copy.deepcopy(self._config(adapters[0]))
        config.init = "zeros"  # the factors are written below
        if combination_type == "cat":
            ranks = {g: [self.lotr_groups[a][g].rank for a in adapters] for g in groups}
            config.rank_pattern = {g: (sum(r[0] for r in rs), sum(r[1] for r in rs)) for g, rs in ranks.items()}
            if config.lotr_layout is not None:  # a saved adapter's groups: the same, at the summed ranks
                for g, group in config.lotr_layout["groups"].items():
                    group["rank"] = list(config.rank_pattern[g])
        self.peft_config[adapter_name] = config
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        with torch.no_grad():
            for group, layout in self.lotr_groups[adapter_name].items():
                self._combine(adapters, weights, adapter_name, group, layout, combination_type)
        self.set_requires_grad(adapter_name, requires_grad=False)

    def _check_shared_factors(self, adapters: list[str]) -> None:
        first = adapters[0]
        for group in self.lotr_groups[first]:
            factors = self._factors(first, group)
            for other in adapters[1:]:
                theirs = self._factors(other, group)
                same = theirs is factors or all(
                    a.shape == b.shape and torch.equal(a, b.to(a))
                    for a, b in ((factors.out_factor, theirs.out_factor), (factors.in_factor, theirs.in_factor))
                )
                if not same:
                    raise ValueError(
                        f"combination_type='linear' combines adapters that share their factors, but {first!r} and "
                        f"{other!r} have different U, V in group {group!r}: their weighted sum is not an adapter on "
                        "one pair of factors at that rank; combination_type='cat' combines them exactly, at rank the "
                        "sum of their ranks"
                    )

    def _combine(
        self, adapters: list[str], weights: list[float], new: str, group: str, layout: GroupLayout, how: str
    ) -> None:
        target = self._factors(new, group)
        sources = [self._factors(a, group) for a in adapters]
        work = torch.promote_types(target.out_factor.dtype, torch.float32)
        if how == "linear":
            target.out_factor.copy_(sources[0].out_factor)
            target.in_factor.copy_(sources[0].in_factor)
        else:
            target.out_factor.copy_(torch.cat([f.out_factor.to(target.out_factor) for f in sources], dim=1))
            target.in_factor.copy_(torch.cat([f.in_factor.to(target.in_factor) for f in sources], dim=1))
        for name in layout.modules:
            layer = cast(LoTRLinear, self.model.get_submodule(name))
            parts = [w * layer.scales[a] * layer.lotr_cores[a].to(work) for a, w in zip(adapters, weights, strict=True)]
            core = torch.stack(parts).sum(0) if how == "linear" else torch.block_diag(*parts)  # type: ignore[no-untyped-call]
            layer.lotr_cores[new].copy_(core / layer.scales[new])
