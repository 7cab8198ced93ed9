"""``LoTRModel``: a model with named LoTR adapters (attach, switch, forward, merge, unload), and ``get_lotr_model``.

The model's other jobs are plain functions in their own modules, behind thin methods:
saving, loading and the Hub in :mod:`tensorlotr.nn.saving`, whose methods (``save_pretrained``,
``from_pretrained``, ``load_adapter``, …), and the adapters-only ``state_dict``, ``LoTRModel``
inherits from :class:`tensorlotr.nn.pretrained.PretrainedMixin`; PEFT's status API (``get_layer_status``,
``get_model_status``, :class:`TunerLayerStatus`, :class:`TunerModelStatus`) in
:mod:`tensorlotr.nn.status`; weighted combinations of adapters in :mod:`tensorlotr.nn.combine`;
TRL's reference model (:class:`LoTRReferenceModel`) and fused LM head in
:mod:`tensorlotr.nn.reference`. The copies of ``modules_to_save`` are
:class:`tensorlotr.nn.modules_to_save.ModulesToSaveWrapper` s. The names those modules
define stay importable from here.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapter import LoTRConfig
from ..adapter.groups import is_conv1d
from ..adapter.layout import GroupLayout
from ..core import Tucker2, check_rank, tucker2
from . import combine, status
from .layer import BASE_ADAPTER, DEFAULT_ADAPTER, LoTRFactors, LoTRLayer, check_adapter_name
from .modules_to_save import ModulesToSaveWrapper, swap_module
from .pretrained import PretrainedMixin
from .reference import FUSED_LM_HEAD, LoTRReferenceModel, adopt_fused_lm_head, is_fused_lm_head
from .sharing import share_input_products
from .status import TunerLayerStatus, TunerModelStatus
from .targets import (
    build_groups,
    dense_weight,
    is_supported,
    resolve_modules_to_save,
    resolve_targets,
    unwrap,
    weight_of,
    weight_shape,
)

if TYPE_CHECKING:
    from ..adapter.lora import LoRAConversion

__all__ = [
    "FUSED_LM_HEAD",
    "LoTRModel",
    "LoTRReferenceModel",
    "TunerLayerStatus",
    "TunerModelStatus",
    "get_lotr_model",
]


def _bound_forward(lotr: LoTRModel, model: nn.Module) -> functools.partial[Any]:
    """``lotr.forward`` bound to ``lotr``, carrying the base model's signature.

    ``transformers.Trainer`` keeps the dataset columns that ``inspect.signature(model.forward)``
    names (``remove_unused_columns``), so the bound forward shows the base model's inputs.
    """
    forward = functools.partial(type(lotr).forward, lotr)
    with contextlib.suppress(TypeError, ValueError):  # a forward without a signature keeps (*args, **kwargs)
        forward.__signature__ = inspect.signature(model.forward)  # type: ignore[attr-defined]
    return forward


def _refuse_adapted(model: nn.Module) -> None:
    """Raise ``ValueError`` when ``model`` already carries LoTR adapters: a second wrap would freeze the first."""
    if isinstance(model, LoTRModel):
        raise ValueError(
            f"the model is already a LoTRModel with adapter groups {sorted(model.groups)}; add another adapter "
            "with its add_adapter(name, config), attach this one to a fresh base model, or remove the existing one "
            "first with unload() or merge_and_unload()"
        )
    adapted = [(name, module) for name, module in model.named_modules() if isinstance(module, LoTRLayer)]
    if adapted:
        ranks = sorted({module.factors.rank for _, module in adapted})
        names = ", ".join(repr(name) for name, _ in adapted[:3]) + (", ..." if len(adapted) > 3 else "")
        raise ValueError(
            f"the model already carries a LoTR adapter: {len(adapted)} LoTRLayer modules ({names}) of rank "
            f"{', '.join(map(str, ranks))}; add another adapter with LoTRModel.add_adapter(name, config), attach it to "
            "a fresh base model, or remove the existing one first with unload() or merge_and_unload() on its LoTRModel"
        )


def _refuse_meta_weights(model: nn.Module, groups: dict[str, GroupLayout]) -> None:
    """``init="svd"`` decomposes the pretrained weights: they must hold data."""
    for group_name, group in groups.items():
        for name in group.modules:
            if model.get_submodule(name).weight.is_meta:
                raise ValueError(
                    f"init='svd' decomposes the pretrained weights of group {group_name!r}, but {name!r} is on the "
                    "meta device (a model built under accelerate's init_empty_weights(), say); "
                    "load the base weights first, or use init='zeros'"
                )


class LoTRModel(PretrainedMixin, nn.Module):
    """A model whose targeted Linear / Conv1D layers carry named LoTR adapters.

    The base model's parameters are frozen. Each adapter's groups hold factors ``U`` and
    ``V``, registered once in ``lotr_factors`` and referenced from the layers (adapters of a
    zoo share them); each adapted layer owns one core per adapter. The adapter ``"default"``
    keys its factors by group name (``lotr_factors["query"]``); another adapter ``a`` by
    ``"a--<group>"``, a zoo's shared factors by ``"<zoo>--<group>"``.

    As in PEFT: ``add_adapter``, ``set_adapter``, ``delete_adapter``, ``active_adapter(s)``,
    ``load_adapter``, ``disable_adapter()``; ``model(..., adapter_names=[...])`` runs a mixed
    batch, one adapter (or ``"__base__"``) per sample, through ``generate()`` too. Each module
    of an adapter's ``modules_to_save`` gets a trainable copy that sits in the base model while
    that adapter is active; the original is kept, frozen, in ``original_modules``. Attributes
    the wrapper lacks are looked up on the base model, as with PEFT's ``PeftModel``.

    Build it with :func:`get_lotr_model`, :meth:`from_pretrained` or :meth:`from_lora`.

    Shapes: a group of ``L`` adapted layers of weight (d_out, d_in) holds ``U`` (d_out, r_out)
    and ``V`` (d_in, r_in) once, and a core ``G_l`` (r_out, r_in) in each layer; the layer adds
    ``scale * x V G_l^T U^T`` to its output, ``x`` (..., d_in).

    Examples
    --------
    A 2-layer BERT of hidden size 32: each group stacks two (32, 32) weights, with ``U``
    (32, 4), ``V`` (32, 4) and a (4, 4) core per layer.

    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query", "value"]))
    >>> {name: (len(g.modules), g.shape, g.rank) for name, g in lotr.groups.items()}
    {'query': (2, (32, 32), (4, 4)), 'value': (2, (32, 32), (4, 4))}
    >>> tuple(lotr.lotr_factors["query"].out_factor.shape), tuple(lotr.lotr_factors["query"].in_factor.shape)
    ((32, 4), (32, 4))
    >>> lotr(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state.shape  # (batch, tokens, hidden)
    torch.Size([1, 3, 32])
    >>> lotr.add_adapter("other", LoTRConfig(rank=2, target_modules=["query"]))
    >>> lotr(input_ids=torch.tensor([[1, 2, 3], [4, 5, 6]]), adapter_names=["default", "other"]).last_hidden_state.shape
    torch.Size([2, 3, 32])
    """

    #: Set by :meth:`from_lora`: the conversion of the LoRA.
    conversion_report: LoRAConversion
    #: Set by :meth:`from_peft_model`: each group's relative error of the conversion.
    conversion_errors: dict[str, float]

    def __init__(
        self,
        model: nn.Module,
        config: LoTRConfig,
        *,
        layout: dict[str, GroupLayout] | None = None,
        source: str = "the adapter",
        adapter_name: str = DEFAULT_ADAPTER,
        factor_owner: str | Mapping[str, str] | None = None,
    ) -> None:
        _refuse_adapted(model)
        check_adapter_name(adapter_name)
        initialise = layout is None
        groups = self._plan(model, config) if layout is None else layout
        if initialise and config.init == "svd":
            _refuse_meta_weights(model, groups)
        super().__init__()
        self.base_model = model
        self.lotr_factors = nn.ModuleDict()
        self.lotr_configs: dict[str, LoTRConfig] = {}
        self.adapter_groups: dict[str, dict[str, GroupLayout]] = {}
        self._factor_keys: dict[str, dict[str, str]] = {}
        self._active: list[str] = []
        self._trainable: dict[str, bool] = {}
        self.modules_to_save_wrappers = nn.ModuleList()  # one ModulesToSaveWrapper per module of modules_to_save
        self._in_place: str | None = None  # the adapter whose copies of modules_to_save are in the model
        self._sharing_hooks: list[Any] = []
        self._enabled = True  # False after disable_adapter_layers()
        self._fused_lm_head: dict[str, Any] | None = None  # the options of TRL's fused LM head, once adopted
        for param in model.parameters():
            param.requires_grad_(False)
        self._active = [adapter_name]
        self._attach(adapter_name, config, groups, source=source, initialise=initialise, factor_owner=factor_owner)
        self.forward = _bound_forward(self, model)  # type: ignore[method-assign]  # the base model's signature

    def forward(self, *args: Any, labels: Any = None, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """Run the base model with its adapters; ``labels`` are passed on when given.

        ``adapter_names`` (one per sample; ``"__base__"`` for none) serves a mixed batch;
        it is refused (``ValueError``) while an adapter is merged, as in PEFT.
        Naming ``labels`` here lets ``transformers.Trainer`` find the labels in the class's
        signature, so ``evaluate()`` computes ``eval_loss``. Each instance's ``forward`` is
        this method bound, with the base model's signature (see :func:`_bound_forward`).
        """
        if labels is not None:
            kwargs["labels"] = labels
        with self._mixed_batch(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
        """The base model's ``generate``, with ``adapter_names`` serving a mixed batch as in :meth:`forward`."""
        model: Any = self.base_model  # a transformers model with generate()
        with self._mixed_batch(adapter_names):
            return model.generate(*args, **kwargs)

    @contextmanager
    def _mixed_batch(self, adapter_names: list[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        if isinstance(adapter_names, str):
            raise ValueError(f"adapter_names must be a list of adapter names, one per sample, got {adapter_names!r}")
        names = list(adapter_names)
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in self.lotr_configs})
        if unknown:
            raise ValueError(f"adapter_names holds unknown adapters {unknown}; adapters: {sorted(self.lotr_configs)}")
        merged = sorted({n for _, layer in self.lotr_layers() for n in layer.merged_adapters})
        if merged:  # the base weights hold their updates: no row could get the base, or another adapter, alone
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first. "
                f"(adapters {merged} are merged into the base weights, so no sample could get the base model or "
                "another adapter alone)"
            )
        with_copies = {n for n in set(names) if self._has_copies(n)}
        if with_copies and (len(set(names)) > 1 or with_copies != {self._in_place}):
            raise ValueError(
                f"adapters {sorted(with_copies)} have modules_to_save, which a mixed batch cannot switch per sample; "
                "serve them with set_adapter(name) one at a time"
            )
        layers = [layer for _, layer in self.lotr_layers()]
        for layer in layers:
            layer.batch_adapters = names
        try:
            yield
        finally:
            for layer in layers:
                layer.batch_adapters = None

    # --- construction -------------------------------------------------------------
    @staticmethod
    def _plan(model: nn.Module, config: LoTRConfig) -> dict[str, GroupLayout]:
        """The groups ``config`` makes of ``model``; ranks the shapes cannot take are refused before any tensor."""
        names = resolve_targets(model, config)
        groups = build_groups(model, names, config)
        for g in groups:
            check_rank(g.name, len(g.modules), g.shape, config.rank_of(g.name, g.modules))
        return {
            g.name: GroupLayout(
                list(g.modules),
                g.shape,
                config.rank_of(g.name, g.modules),
                config.scale_of(g.name, g.modules),
                fan_in_fan_out=is_conv1d(unwrap(model.get_submodule(g.modules[0]))),
            )
            for g in groups
        }

    def _attach(
        self,
        adapter: str,
        config: LoTRConfig,
        groups: dict[str, GroupLayout],
        *,
        source: str,
        initialise: bool,
        shared: dict[str, LoTRFactors] | None = None,
        factor_owner: str | Mapping[str, str] | None = None,
    ) -> None:
        """Add adapter ``adapter``: its factors (or the ``shared`` ones, by group), a core in each layer, copies."""
        if adapter in self.lotr_configs:
            raise ValueError(f"the model already has an adapter {adapter!r}; adapters: {sorted(self.lotr_configs)}")
        self._check_layout(groups, source)
        self.lotr_configs[adapter] = config
        self.adapter_groups[adapter] = dict(groups)

        def owner(group: str) -> str:  # who owns the group's factors: the adapter, or the zoo whose they are
            found = factor_owner.get(group) if isinstance(factor_owner, Mapping) else factor_owner
            return found or adapter

        self._factor_keys[adapter] = {g: g if owner(g) == DEFAULT_ADAPTER else f"{owner(g)}--{g}" for g in groups}
        for group_name, group in groups.items():
            key = self._factor_keys[adapter][group_name]
            first = weight_of(unwrap(self.base_model.get_submodule(group.modules[0])))
            if shared is not None and group_name in shared:
                factors = shared[group_name]
            else:
                dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
                if config.adapter_dtype is not None:
                    dtype = getattr(torch, config.adapter_dtype)
                factors = LoTRFactors(*group.shape, group.rank, dtype=dtype).to(first.device)
                if initialise:
                    self._initialise(factors, group, config)
            if key not in self.lotr_factors:
                self.lotr_factors[key] = factors
            for name in group.modules:
                module = self.base_model.get_submodule(name)
                if isinstance(module, LoTRLayer):
                    module.add_adapter(adapter, factors, group.scale)
                    module.active_adapters = [a for a in self._active if a in module.lotr_cores]
                else:
                    layer = LoTRLayer(module, factors, group.scale, config.dropout, adapter_name=adapter)
                    layer.active_adapters = [a for a in self._active if a in layer.lotr_cores]
                    layer.active = self._enabled
                    swap_module(self.base_model, name, layer.to(first.device))
        for handle in self._sharing_hooks:
            handle.remove()
        self._sharing_hooks = share_input_products(self.base_model)
        self._copy_modules_to_save(
            adapter, resolve_modules_to_save(self.base_model, config.modules_to_save, config.task_type)
        )
        self._trainable[adapter] = not config.inference_mode  # PEFT's inference_mode: the adapter is frozen
        self._mark_trainable()

    def _check_layout(self, groups: dict[str, GroupLayout], source: str) -> None:
        modules = dict(self.base_model.named_modules())
        for group_name, group in groups.items():
            for name in group.modules:
                module = modules.get(name)
                if module is None:
                    raise ValueError(f"{source} adapts module {name!r} (group {group_name!r}), which the model lacks")
                module = unwrap(module)
                if not is_supported(module):
                    raise ValueError(f"{source} adapts module {name!r}, a {type(module).__name__}, not Linear/Conv1D")
                if weight_shape(module) != tuple(group.shape):
                    d_out, d_in = weight_shape(module)
                    raise ValueError(
                        f"{source} expects module {name!r} of shape {group.shape[0]}x{group.shape[1]} "
                        f"(d_out x d_in), but the model's is {d_out}x{d_in}"
                    )

    def _initialise(self, factors: LoTRFactors, group: GroupLayout, config: LoTRConfig) -> None:
        if config.init == "normal":
            factors.reset_normal()
        elif config.init == "svd":
            weights = [dense_weight(unwrap(self.base_model.get_submodule(n))).detach() for n in group.modules]
            decomposition = tucker2(torch.stack(weights).to(torch.float64), group.rank)
            with torch.no_grad():
                factors.reset_orthonormal()  # fills columns a small stack cannot
                r_out, r_in = decomposition.rank
                factors.out_factor[:, :r_out] = decomposition.out_factor.to(factors.out_factor.dtype)
                factors.in_factor[:, :r_in] = decomposition.in_factor.to(factors.in_factor.dtype)

    def _copy_modules_to_save(self, adapter: str, names: list[str]) -> None:
        """Give ``adapter`` a trainable copy of each module of its ``modules_to_save``; keep the original aside.

        Training changes only the copy, so :meth:`disable_adapter` can run the original, and
        a weight the original shares with another module (a GPT-2 or Llama ``lm_head`` tied
        to the input embeddings) is never changed through it. For an adapted module the copy
        is of its base layer and shares the frozen weight: only its other tensors (a bias) train.
        The first adapter's copies sit in the model; other adapters' wait in their wrapper's
        ``stored_copies`` until :meth:`set_adapter` puts them in place.
        """

        in_place = self._in_place is None or self._in_place == adapter
        for name in names:
            path = name
            if isinstance(self.base_model.get_submodule(name), LoTRLayer):
                path = f"{name}.base_layer"
            wrapper = next((w for w in self._wrappers() if w.path == path), None)
            original = wrapper.original_module if wrapper is not None else self.base_model.get_submodule(path)
            inner = [f"{path}.{n}" for n, m in original.named_modules() if isinstance(m, LoTRLayer)]
            if inner:
                raise ValueError(
                    f"modules_to_save names {name!r}, which contains adapted modules ({', '.join(inner[:3])}); "
                    "list its other submodules instead, or leave them out of target_modules"
                )
            if wrapper is None:
                wrapper = ModulesToSaveWrapper(self.base_model, path)
                self.modules_to_save_wrappers.append(wrapper)
            wrapper.add_adapter(adapter, name, place=in_place and self._enabled)
        if in_place and names:
            self._in_place = adapter

    def _wrappers(self) -> list[ModulesToSaveWrapper]:
        """The wrappers of the modules of every adapter's ``modules_to_save``, in the order they were listed."""
        return [w for w in self.modules_to_save_wrappers if isinstance(w, ModulesToSaveWrapper)]

    def _saved_names(self, adapter: str) -> list[str]:
        """The modules of ``adapter``'s ``modules_to_save`` (module paths, as its config lists them)."""
        return [w.names[adapter] for w in self._wrappers() if adapter in w.names]

    def _has_copies(self, adapter: str) -> bool:
        """True when ``adapter`` has copies of ``modules_to_save``."""
        return bool(self._saved_names(adapter))

    def _place_copies(self, adapter: str) -> None:
        """Put ``adapter``'s copies of its ``modules_to_save`` in the model (originals where it has none)."""

        if self._in_place == adapter or (self._in_place is None and not self._has_copies(adapter)):
            return
        for wrapper in self._wrappers():
            wrapper.set_adapter(adapter if self._enabled else None)  # disabled: the originals stay in place
        self._in_place = adapter if self._has_copies(adapter) else None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base_model", "lotr_factors", "modules_to_save_wrappers", "original_modules"}:
                raise
            return getattr(self.base_model, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward" and is_fused_lm_head(self, value):
            self._adopt_fused_lm_head(value)
            return
        super().__setattr__(name, value)

    def _adopt_fused_lm_head(self, patched: types.MethodType) -> None:
        """Apply TRL's fused LM head to the base model, not to this wrapper: :func:`.reference.adopt_fused_lm_head`."""
        adopt_fused_lm_head(self, patched)

    def reference_model(self) -> LoTRReferenceModel:
        """This model with its adapters disabled, as a module: TRL's ``ref_model`` without a second copy.

        See :class:`LoTRReferenceModel`. TRL's ``DPOTrainer`` uses a ``PeftModel`` with its
        adapter disabled as the reference by itself; with a ``LoTRModel`` pass
        ``ref_model=lotr.reference_model()`` to get the same (without it, TRL loads a second
        copy of the base model from ``config._name_or_path``).

        Examples
        --------
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
        >>> type(lotr.reference_model()).__name__, lotr.reference_model().config is lotr.config
        ('LoTRReferenceModel', True)
        """
        return LoTRReferenceModel(self)

    # --- named adapters ---------------------------------------------------------------
    @property
    def active_adapters(self) -> list[str]:
        """The active adapters; their updates add up."""
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        """The first active adapter (PEFT's ``active_adapter``)."""
        return self._active[0]

    @property
    def lotr_config(self) -> LoTRConfig:
        """The config of the active adapter."""
        return self.lotr_configs[self.active_adapter]

    @property
    def groups(self) -> dict[str, GroupLayout]:
        """The groups of the active adapter."""
        return self.adapter_groups[self.active_adapter]

    @property
    def modules_to_save(self) -> list[str]:
        """The ``modules_to_save`` of the active adapter (module paths)."""

        return self._saved_names(self.active_adapter)

    @property
    def original_modules(self) -> nn.ModuleList:
        """The frozen originals of the modules of ``modules_to_save``, one per module, as PEFT keeps them."""
        return nn.ModuleList([w.original_module for w in self._wrappers()])

    @property
    def peft_config(self) -> dict[str, LoTRConfig]:
        """Each adapter's config by name (``lotr_configs``), under PEFT's name.

        Examples
        --------
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
        >>> lotr.peft_config["default"].rank, lotr.peft_config is lotr.lotr_configs
        ((4, 4), True)
        """
        return self.lotr_configs

    @property
    def active_peft_config(self) -> LoTRConfig:
        """The config of the active adapter, under PEFT's name."""
        return self.lotr_config

    # --- PEFT's switches ------------------------------------------------------------------------
    def disable_adapter_layers(self) -> None:
        """Switch every adapter off until :meth:`enable_adapter_layers`: the base model runs, as in PEFT.

        The original ``modules_to_save`` go in place of the copies (which stay parameters of the
        model, so optimizers and :meth:`state_dict` still see them). Merged adapters are unmerged
        first, with a warning, as PEFT does. ``with disable_adapter():`` does the same for a block.

        Examples
        --------
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model, tucker2
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> base = BertModel(bert).eval()
        >>> x = torch.tensor([[1, 2, 3]])
        >>> expected = base(input_ids=x).last_hidden_state
        >>> lotr = get_lotr_model(base, LoTRConfig(rank=4, target_modules=["query"])).eval()
        >>> lotr.load_tucker("query", tucker2(torch.randn(2, 32, 32), rank=4))  # as if trained
        >>> lotr.disable_adapter_layers()
        >>> torch.equal(lotr(input_ids=x).last_hidden_state, expected), lotr.get_model_status().enabled
        (True, False)
        >>> lotr.enable_adapter_layers()
        >>> torch.equal(lotr(input_ids=x).last_hidden_state, expected)
        False
        """
        if any(layer.merged for _, layer in self.lotr_layers()):
            warnings.warn("Unmerging the merged adapters before disabling them, as PEFT does", stacklevel=2)
            self.unmerge_adapter()
        for _, layer in self.lotr_layers():
            layer.active = False
        for wrapper in self._wrappers():
            wrapper.set_adapter(None)
        self._enabled = False

    def enable_adapter_layers(self) -> None:
        """Switch the adapters back on after :meth:`disable_adapter_layers`; the active copies go back in place."""
        for _, layer in self.lotr_layers():
            layer.active = True
        for wrapper in self._wrappers():
            wrapper.set_adapter(self._in_place)
        self._enabled = True

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        """Let the named adapters train (``requires_grad``) or freeze them, active or not, as PEFT's method.

        Their factors, cores and copies of ``modules_to_save`` are switched; factors shared with
        other adapters (a zoo) are switched for those too. :meth:`set_adapter` later makes the
        adapters it activates train only if they were last left trainable.

        Examples
        --------
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
        >>> lotr.set_requires_grad("default", requires_grad=False)
        >>> lotr.get_nb_trainable_parameters()[0], lotr.get_model_status().requires_grad
        (0, {'default': False})
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.lotr_configs]
        if unknown:
            raise ValueError(f"no adapter {unknown!r}; adapters: {sorted(self.lotr_configs)}")
        for adapter in names:
            self._trainable[adapter] = requires_grad
            for key in self._factor_keys[adapter].values():
                self.lotr_factors[key].requires_grad_(requires_grad)
            for _, layer in self.lotr_layers():
                if adapter in layer.lotr_cores:
                    layer.lotr_cores[adapter].requires_grad_(requires_grad)
            for owner, attr in self._saved_slots(adapter).values():
                tensor = getattr(owner, attr)
                if isinstance(tensor, nn.Parameter):
                    tensor.requires_grad_(requires_grad)

    def get_layer_status(self) -> list[TunerLayerStatus]:
        """The status of each adapted layer and copied ``modules_to_save`` module, shaped as PEFT's.

        Examples
        --------
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
        >>> first = lotr.get_layer_status()[0]
        >>> first.name, first.module_type, first.active_adapters, first.requires_grad, first.devices
        ('encoder.layer.0.attention.self.query', 'LoTRLayer', ['default'], {'default': True}, {'default': ['cpu']})
        """
        return status.get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The status of the model's adapters, shaped as PEFT's ``get_model_status()``; ``peft_types`` are ``"LOTR"``.

        Examples
        --------
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
        >>> status = lotr.get_model_status()
        >>> status.adapter_model_type, status.peft_types, status.trainable_params, status.num_adapter_layers
        ('LoTRModel', {'default': 'LOTR'}, 288, 2)
        """
        return status.get_model_status(self)

    def add_adapter(self, adapter_name: str, config: LoTRConfig) -> None:
        """Attach a new adapter ``adapter_name`` with ``config``; it starts inactive, as in PEFT.

        Its groups get their own ``U`` (d_out, r_out) and ``V`` (d_in, r_in), and each of
        their layers a core (r_out, r_in), at ``config``'s ranks.

        Examples
        --------
        A 2-layer BERT of hidden size 32 with the adapter ``"default"`` at rank 4; ``"other"``
        adds rank-2 factors (32, 2) and two (2, 2) cores to the ``query`` projections:

        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query", "value"]))
        >>> lotr.add_adapter("other", LoTRConfig(rank=2, target_modules=["query"]))
        >>> lotr.active_adapters, sorted(lotr.lotr_configs)
        (['default'], ['default', 'other'])
        >>> lotr.adapter_groups["other"]["query"].rank, lotr.tucker("query", adapter="other").core.shape
        ((2, 2), torch.Size([2, 2, 2]))
        """
        check_adapter_name(adapter_name)
        groups = self._plan(self.base_model, config)
        if config.init == "svd":
            _refuse_meta_weights(self.base_model, groups)
        self._attach(adapter_name, config, groups, source=f"adapter {adapter_name!r}", initialise=True)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` (or a list of names) the active adapters; only they train.

        The updates of several active adapters add up: ``dW_l = sum_a U_a G_{a,l} V_a^T``.

        Examples
        --------
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query", "value"]))
        >>> lotr.add_adapter("other", LoTRConfig(rank=2, target_modules=["query"]))
        >>> lotr.set_adapter("other")  # only its U (32, 2), V (32, 2) and two (2, 2) cores train
        >>> lotr.active_adapter, lotr.get_nb_trainable_parameters()[0]  # 2*32 + 2*32 + 2*2*2
        ('other', 136)
        >>> lotr.set_adapter(["default", "other"])  # both train: 576 + 136
        >>> lotr.active_adapters, lotr.get_nb_trainable_parameters()[0]
        (['default', 'other'], 712)
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.lotr_configs]
        if not names or unknown:
            raise ValueError(f"no adapter {unknown or names!r}; adapters: {sorted(self.lotr_configs)}")
        if any(layer.merged for _, layer in self.lotr_layers()):
            raise RuntimeError("unmerge_adapter() before set_adapter(): merged weights cannot be switched")
        with_copies = [n for n in names if self._has_copies(n)]
        if len(with_copies) > 1:
            raise ValueError(f"adapters {with_copies} both have modules_to_save; activate one of them at a time")
        self._active = names
        self._place_copies(with_copies[0] if with_copies else names[0])
        for _, layer in self.lotr_layers():
            layer.active_adapters = [n for n in names if n in layer.lotr_cores]
        self._mark_trainable()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove adapter ``adapter_name``: its cores, the factors no other adapter uses, its copies.

        Examples
        --------
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query", "value"]))
        >>> lotr.add_adapter("other", LoTRConfig(rank=2, target_modules=["query"]))
        >>> sorted(lotr.lotr_factors)  # the U and V of each group, by adapter
        ['other--query', 'query', 'value']
        >>> lotr.delete_adapter("other")
        >>> sorted(lotr.lotr_configs), sorted(lotr.lotr_factors)
        (['default'], ['query', 'value'])
        """
        if adapter_name not in self.lotr_configs:
            raise ValueError(f"no adapter {adapter_name!r}; adapters: {sorted(self.lotr_configs)}")
        if len(self.lotr_configs) == 1:
            raise ValueError(f"{adapter_name!r} is the only adapter; unload() removes the adapters altogether")
        if self._in_place == adapter_name:
            others = [n for n in self.lotr_configs if n != adapter_name]
            self._place_copies(next((n for n in others if self._has_copies(n)), others[0]))
        for name, layer in list(self.lotr_layers()):
            if adapter_name in layer.lotr_cores:
                layer.delete_adapter(adapter_name)
                if not layer.lotr_cores:
                    swap_module(self.base_model, name, layer.base_layer)
        used = {k for a, keys in self._factor_keys.items() if a != adapter_name for k in keys.values()}
        for key in self._factor_keys[adapter_name].values():
            if key not in used and key in self.lotr_factors:
                del self.lotr_factors[key]
        for wrapper in self._wrappers():
            wrapper.delete_adapter(adapter_name)
        self.modules_to_save_wrappers = nn.ModuleList([w for w in self._wrappers() if w.names])
        for table in (self.lotr_configs, self.adapter_groups, self._factor_keys, self._trainable):
            table.pop(adapter_name, None)
        remaining = [n for n in self._active if n != adapter_name] or [next(iter(self.lotr_configs))]
        self.set_adapter(remaining)

    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "linear",
    ) -> None:
        """Add adapter ``adapter_name`` whose update is exactly ``sum_i weights[i] * dW_i``, as PEFT's method.

        The Tucker-2 form makes this cheap for adapters that share their factors: with the same
        ``U`` and ``V`` in every group, ``sum_i w_i s_i U G_i V^T = s U (sum_i w_i s_i G_i / s) V^T``,
        so the new adapter keeps those factors (the very tensors when they are shared, as in a
        zoo, or an equal copy) and its cores are the weighted sum of the cores, at the same rank
        (``combination_type="linear"``, the default). Adapters whose factors differ have no such
        sum at that rank, and ``"linear"`` refuses them, saying so; ``"cat"`` combines any
        adapters on the same groups of modules exactly, with the factors side by side,
        ``[U_1 … U_n]`` and ``[V_1 … V_n]``, and a block-diagonal core, at rank the sum of the
        ranks. LoRA's approximate combinations (``svd``, ``ties``, ``dare_*``) are not offered.
        Adapters with ``modules_to_save`` are refused (full copies have no weighted sum). The
        new adapter is inactive and frozen, as PEFT makes it; :meth:`set_adapter` activates it.

        Examples
        --------
        Two adapters of a zoo share ``U`` (32, 4) and ``V`` (32, 4); their mix shares them too,
        and only adds its two (4, 4) cores:

        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRModel
        >>> from tensorlotr.adapter.layout import GroupLayout, ZooAdapter, ZooFiles, factor_key, zoo_core_key
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> modules = [f"encoder.layer.{i}.attention.self.query" for i in range(2)]
        >>> tensors = {factor_key("query", which): torch.randn(32, 4) for which in ("out_factor", "in_factor")}
        >>> tensors |= {zoo_core_key(a, m): torch.randn(4, 4) for a in ("a", "b") for m in modules}
        >>> adapters = {a: ZooAdapter(f"lora-{a}", {"query": modules}) for a in ("a", "b")}
        >>> zoo = ZooFiles({"query": GroupLayout(modules, (32, 32), (4, 4), 1.0)}, adapters, tensors)
        >>> lotr = LoTRModel.from_zoo(BertModel(bert), zoo)
        >>> lotr.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix")  # exact, rank (4, 4)
        >>> list(lotr.lotr_factors), lotr.adapter_groups["mix"]["query"].rank
        (['zoo--query'], (4, 4))
        >>> mixed = lotr.tucker("query", "mix").to_dense()
        >>> both = 0.7 * lotr.tucker("query", "a").to_dense() + 0.3 * lotr.tucker("query", "b").to_dense()
        >>> torch.allclose(mixed, both, atol=1e-5)
        True
        >>> lotr.add_weighted_adapter(["a", "b"], [1.0, -1.0], "diff", combination_type="cat")  # exact, rank 8
        >>> lotr.adapter_groups["diff"]["query"].rank
        (8, 8)
        """
        combine.add_weighted_adapter(self, adapters, weights, adapter_name, combination_type)

    def _mark_trainable(self) -> None:
        """Only the active adapters that were loaded trainable have ``requires_grad``."""
        for adapter in self.lotr_configs:
            train = adapter in self._active and self._trainable.get(adapter, True)
            for key in self._factor_keys[adapter].values():
                if not any(key in self._factor_keys[a].values() for a in self._active if a != adapter):
                    self.lotr_factors[key].requires_grad_(train)
            for _, layer in self.lotr_layers():
                if adapter in layer.lotr_cores:
                    layer.lotr_cores[adapter].requires_grad_(train)
            for _, (owner, attr) in self._saved_slots(adapter).items():
                tensor = getattr(owner, attr)
                if isinstance(tensor, nn.Parameter):
                    tensor.requires_grad_(train)

    def _set_trainable(self, adapter: str, is_trainable: bool) -> None:
        """Let adapter ``adapter`` train (when active) or freeze it."""
        self._trainable[adapter] = is_trainable
        self._mark_trainable()

    def _saved_slots(self, adapter: str) -> dict[str, tuple[nn.Module, str]]:
        """``adapter``'s ``modules_to_save`` tensors by plain parameter path, as (owning module, attribute).

        An adapted module may be listed too (its bias changed in a full fine-tune, say): then
        its other tensors are saved under their plain names (``….dense.bias``) and its frozen
        base weight is left out.
        """
        slots: dict[str, tuple[nn.Module, str]] = {}
        for wrapper in self._wrappers():
            if adapter in wrapper.names:
                slots.update(wrapper.tensor_slots(adapter))
        return slots

    # --- inspection -----------------------------------------------------------------
    def lotr_layers(self) -> Iterator[tuple[str, LoTRLayer]]:
        """``(module path, layer)`` for every adapted layer, in model order."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, LoTRLayer):
                yield name, module

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts; shared factors are counted once."""
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            if param.requires_grad:
                trainable += param.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    def tucker(self, group: str, adapter: str | None = None) -> Tucker2:
        """The group's update as a :class:`tensorlotr.Tucker2`: ``dW_l = U (scale G_l) V^T``.

        The tensors are detached copies: core (L, r_out, r_in), U (d_out, r_out), V (d_in, r_in).

        Examples
        --------
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model, tucker2
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query", "value"]))
        >>> tucker = lotr.tucker("query")  # two layers of 32 x 32 at rank (4, 4)
        >>> tucker
        Tucker2(shape=(2, 32, 32), rank=(4, 4))
        >>> tuple(tucker.core.shape), tuple(tucker.out_factor.shape), tuple(tucker.in_factor.shape)
        ((2, 4, 4), (32, 4), (32, 4))
        >>> float(tucker.norm())  # the cores start at zero: so does the update
        0.0
        >>> lotr.load_tucker("query", tucker2(torch.randn(2, 32, 32), rank=4))  # set U, V and the cores
        >>> lotr.tucker("query").to_dense().shape  # the updates dW_l, (L, d_out, d_in)
        torch.Size([2, 32, 32])
        """
        adapter = adapter or self.active_adapter
        layout, factors = self._group(group, adapter)
        cores = torch.stack([self._layer(n).lotr_cores[adapter].detach() for n in layout.modules])
        return Tucker2(layout.scale * cores, factors.out_factor.detach().clone(), factors.in_factor.detach().clone())

    @torch.no_grad()
    def load_tucker(self, group: str, tucker: Tucker2, adapter: str | None = None) -> None:
        """Set a group's factors and cores from a Tucker2 of the same shape and rank."""
        adapter = adapter or self.active_adapter
        layout, factors = self._group(group, adapter)
        expected = (len(layout.modules), *layout.shape)
        if tucker.shape != expected or tucker.rank != tuple(layout.rank):
            raise ValueError(
                f"group {group!r} has shape {expected} and rank {tuple(layout.rank)}; "
                f"got a Tucker2 of shape {tucker.shape} and rank {tucker.rank}"
            )
        factors.out_factor.copy_(torch.as_tensor(tucker.out_factor))
        factors.in_factor.copy_(torch.as_tensor(tucker.in_factor))
        core = torch.as_tensor(tucker.core)
        for i, name in enumerate(layout.modules):
            self._layer(name).lotr_cores[adapter].copy_(core[i] / layout.scale)

    def _group(self, group: str, adapter: str) -> tuple[GroupLayout, LoTRFactors]:
        groups = self.adapter_groups[adapter]
        if group not in groups:
            raise KeyError(f"adapter {adapter!r} has no group {group!r}; groups: {list(groups)}")
        return groups[group], self._factors(self._factor_keys[adapter][group])

    def _factors(self, key: str) -> LoTRFactors:
        """The factors registered under ``key`` in ``lotr_factors``."""
        factors = self.lotr_factors[key]
        assert isinstance(factors, LoTRFactors)
        return factors

    def _layer(self, name: str) -> LoTRLayer:
        """The adapted layer at path ``name`` of the base model."""
        layer = self.base_model.get_submodule(name)
        if not isinstance(layer, LoTRLayer):
            raise TypeError(f"{name!r} is a {type(layer).__name__}, not an adapted layer")
        return layer

    # --- adapter on/off, merging ------------------------------------------------------
    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model without any adapter inside the ``with`` block.

        The original ``modules_to_save`` run in place of their trained copies, as in PEFT.

        Examples
        --------
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model, tucker2
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query", "value"])).eval()
        >>> lotr.load_tucker("value", tucker2(torch.randn(2, 32, 32), rank=4))  # a non-zero update, as if trained
        >>> inputs = torch.tensor([[1, 2, 3]])
        >>> adapted = lotr(input_ids=inputs).last_hidden_state  # (1, 3, 32)
        >>> with lotr.disable_adapter():
        ...     base = lotr(input_ids=inputs).last_hidden_state
        >>> torch.allclose(adapted, base)
        False
        >>> torch.equal(lotr(input_ids=inputs).last_hidden_state, adapted)  # the adapter is back after the block
        True
        """

        layers = [layer for _, layer in self.lotr_layers()]
        if any(layer.merged for layer in layers):
            raise RuntimeError("unmerge_adapter() before disable_adapter(): merged weights cannot be switched off")
        states = [layer.active for layer in layers]
        for layer in layers:
            layer.active = False
        try:
            with contextlib.ExitStack() as originals:
                for wrapper in self._wrappers():
                    originals.enter_context(wrapper.disabled())
                yield
        finally:
            for layer, state in zip(layers, states, strict=True):
                layer.active = state

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the active adapters' updates (or those of ``adapter_names``) into the base weights.

        Each adapted weight (d_out, d_in) gets ``scale * U G_l V^T``; the adapter layers stay,
        and :meth:`unmerge_adapter` subtracts the updates again. ``adapter_names`` is a list
        of names (or one name); a name the model lacks is a ``ValueError``. While an adapter
        is merged, mixed batches (``adapter_names=`` in :meth:`forward`) are refused. With
        ``safe_merge`` every merged weight is computed and checked for NaN and Inf first, and
        a broken adapter raises ``ValueError`` (PEFT's message) with no weight changed.

        Examples
        --------
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model, tucker2
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query", "value"])).eval()
        >>> lotr.load_tucker("value", tucker2(torch.randn(2, 32, 32), rank=4))  # a non-zero update, as if trained
        >>> inputs = torch.tensor([[1, 2, 3]])
        >>> adapted = lotr(input_ids=inputs).last_hidden_state  # (1, 3, 32)
        >>> lotr.merge_adapter()  # now W_l + dW_l, no extra work per token
        >>> torch.allclose(lotr(input_ids=inputs).last_hidden_state, adapted, atol=1e-5)
        True
        >>> lotr.unmerge_adapter()
        """
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        unknown = sorted(set(adapter_names or []) - set(self.lotr_configs))
        if unknown:
            raise ValueError(f"merge_adapter: unknown adapters {unknown}; adapters: {sorted(self.lotr_configs)}")
        if not self._enabled:
            raise RuntimeError("the adapters are disabled (disable_adapter_layers()); enable_adapter_layers() first")
        if safe_merge:
            self._check_merge(adapter_names)
        for _, layer in self.lotr_layers():
            layer.merge(adapter_names)

    @torch.no_grad()
    def _check_merge(self, adapter_names: list[str] | None) -> None:
        """Raise ``ValueError`` when merging ``adapter_names`` (default: the active ones) would give NaN or Inf."""
        for _, layer in self.lotr_layers():
            for name in adapter_names if adapter_names is not None else layer.active_adapters:
                if name not in layer.lotr_cores or name in layer.merged_adapters:
                    continue
                weight = dense_weight(layer.base_layer)
                work = torch.promote_types(
                    torch.promote_types(weight.dtype, layer.lotr_cores[name].dtype), torch.float32
                )
                if not torch.isfinite(weight.to(work) + layer.delta_weight(work, name)).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")

    def unmerge_adapter(self) -> None:
        """Subtract merged updates again, restoring the base weights."""
        for _, layer in self.lotr_layers():
            layer.unmerge()

    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge the active adapters (or ``adapter_names``) and return the plain base model, without adapter layers.

        PEFT's keywords: ``safe_merge`` checks every merged weight for NaN and Inf before any is
        written (see :meth:`merge_adapter`); ``progressbar`` shows a bar over the layers. Disabled
        adapters (:meth:`disable_adapter_layers`) are enabled first.

        Examples
        --------
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model, tucker2
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"])).eval()
        >>> lotr.load_tucker("query", tucker2(torch.randn(2, 32, 32), rank=4))  # as if trained
        >>> x = torch.tensor([[1, 2, 3]])
        >>> adapted = lotr(input_ids=x).last_hidden_state
        >>> plain = lotr.merge_and_unload(safe_merge=True, adapter_names=["default"])
        >>> type(plain).__name__, torch.allclose(plain(input_ids=x).last_hidden_state, adapted, atol=1e-5)
        ('BertModel', True)
        """
        if not self._enabled:
            self.enable_adapter_layers()
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        unknown = sorted(set(adapter_names or []) - set(self.lotr_configs))
        if unknown:
            raise ValueError(f"merge_and_unload: unknown adapters {unknown}; adapters: {sorted(self.lotr_configs)}")
        if safe_merge:
            self._check_merge(adapter_names)
        from tqdm.auto import tqdm

        layers = list(self.lotr_layers())
        for _, layer in tqdm(layers, disable=not progressbar, desc="Unloading and merging model"):
            layer.merge(adapter_names)
        return self.unload()

    def unload(self) -> nn.Module:
        """Return the base model with the adapter layers removed (merged ones stay merged).

        The active adapter's trained copies of ``modules_to_save`` stay in the model and the
        originals are dropped, as in PEFT.
        """
        if not self._enabled:
            self.enable_adapter_layers()
        for wrapper in self._wrappers():  # before the layers go: a copy may be a base layer
            wrapper.unload()
        for name, layer in list(self.lotr_layers()):
            swap_module(self.base_model, name, layer.base_layer)
        for handle in self._sharing_hooks:
            handle.remove()
        self._sharing_hooks = []
        self.lotr_factors = nn.ModuleDict()
        self.modules_to_save_wrappers = nn.ModuleList()
        return self.base_model


def get_lotr_model(model: nn.Module, config: LoTRConfig) -> LoTRModel:
    """Freeze ``model`` and attach LoTR adapters to the modules ``config`` targets.

    Parameters
    ----------
    model : nn.Module
        Typically a transformers ``PreTrainedModel``.
    config : LoTRConfig

    Returns
    -------
    LoTRModel
        Trainable parameters: per group ``r_out*d_out + r_in*d_in + L*r_out*r_in``, plus
        the ``modules_to_save``.

    Examples
    --------
    A 2-layer BERT classifier of hidden size 32, rank 4 on ``query`` and ``value``: per group
    ``4*32 + 4*32 + 2*4*4 = 288`` parameters, plus the classifier head (32 x 2 + 2 = 66).

    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from tensorlotr import LoTRConfig, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> config = LoTRConfig(rank=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    >>> lotr = get_lotr_model(BertForSequenceClassification(bert), config)
    >>> lotr.get_nb_trainable_parameters()[0]  # 2 * 288 + 66
    642
    >>> lotr(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([1])).logits.shape  # (batch, num_labels)
    torch.Size([1, 2])
    """
    return LoTRModel(model, config)
