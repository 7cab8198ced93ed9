"""``LoTRModel``: a model with named LoTR adapters (attach, switch, merge, unload), and ``get_lotr_model``.

Saving, loading and the Hub are functions of :mod:`tensorlotr.nn.saving`, the copies of
``modules_to_save`` :class:`tensorlotr.nn.modules_to_save.ModulesToSaveWrapper` s, and the
conversion of a live PEFT model :mod:`tensorlotr.nn.from_peft`; the methods here delegate to them.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
import inspect
import os
import types
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ..adapter import LoTRConfig
from ..adapter.groups import is_conv1d
from ..adapter.layout import GroupLayout, LoTRAdapterFiles, ZooFiles
from ..core import Tucker2, check_rank, tucker2
from . import saving
from .from_peft import lotr_from_peft_model
from .layer import BASE_ADAPTER, DEFAULT_ADAPTER, LoTRFactors, LoTRLayer, check_adapter_name
from .modules_to_save import ModulesToSaveWrapper, swap_module
from .sharing import share_input_products
from .targets import (
    build_groups,
    dense_weight,
    is_supported,
    quantization,
    resolve_modules_to_save,
    resolve_targets,
    unwrap,
    weight_of,
    weight_shape,
)

if TYPE_CHECKING:
    from concurrent.futures import Future

    from huggingface_hub import CommitInfo

    from ..adapter.lora import LoRAConversion


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


#: The keyword of TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``), and the options of that patch.
FUSED_LM_HEAD = "fused_lm_head"
_FUSED_OPTIONS = ("temperature", "cast_lm_head_to_fp32", "outputs")
#: What "cannot adopt TRL's fused LM head" says; ``{detail}`` is why.
_NO_FUSED_LM_HEAD = (
    "TRL patches the model's forward with a fused LM head (add_fused_lm_head) that reads the model's base_model as "
    "its transformer backbone; a LoTRModel applies that patch to its base model instead, but {detail}. Train the "
    "adapter as a PEFT model: SFTTrainer(model=base_model, peft_config=LoTRPeftConfig(...)) with "
    "tensorlotr.peft.LoTRPeftConfig"
)


def _is_fused_lm_head(owner: nn.Module, value: Any) -> bool:
    """True for ``owner.forward = <TRL's fused forward bound to owner>``: a bound method taking ``fused_lm_head``."""
    if not isinstance(value, types.MethodType) or value.__self__ is not owner:
        return False
    code = getattr(value.__func__, "__code__", None)
    if code is None:
        return False
    named = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    return FUSED_LM_HEAD in named


def _fused_lm_head_patch(value: types.MethodType) -> tuple[Any, dict[str, Any]]:
    """TRL's ``add_fused_lm_head`` that made the fused forward ``value``, and the options it was called with."""
    func = value.__func__
    patch = func.__globals__.get("add_fused_lm_head")
    cells = dict(zip(func.__code__.co_freevars, func.__closure__ or (), strict=True))
    options = {}
    for name in _FUSED_OPTIONS:
        with contextlib.suppress(KeyError, ValueError):  # not a variable of the patch, or an empty cell
            options[name] = cells[name].cell_contents
    if not callable(patch) or len(options) != len(_FUSED_OPTIONS):
        detail = f"this TRL's patch does not take the options {_FUSED_OPTIONS} that tensorlotr knows (TRL 1.16)"
        raise TypeError(_NO_FUSED_LM_HEAD.format(detail=detail))
    return patch, options


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


class LoTRReferenceModel(nn.Module):
    """A :class:`LoTRModel` with its adapters disabled: the base model, as a reference for DPO, sharing every weight.

    Its forward runs the LoTR model inside :meth:`LoTRModel.disable_adapter`, so it computes
    the base model (the original ``modules_to_save`` included) with no second copy in memory,
    as TRL's trainers use a ``PeftModel`` with its adapter disabled. It holds no parameters of
    its own (the LoTR model is not its submodule), and attributes it lacks (``config``,
    ``generation_config``, ``device``) are the LoTR model's. Pass it as TRL's ``ref_model``:
    ``DPOTrainer(model=lotr, ref_model=lotr.reference_model(), ...)``. TRL's fused LM head
    works through it too.

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
    >>> reference = lotr.reference_model()
    >>> torch.equal(reference(input_ids=x).last_hidden_state, expected), list(reference.parameters())
    (True, [])
    """

    _lotr: LoTRModel

    def __init__(self, lotr: LoTRModel) -> None:
        super().__init__()
        object.__setattr__(self, "_lotr", lotr)  # not a submodule: no parameter is seen twice

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The LoTR model's forward with its adapters disabled."""
        with self._lotr.disable_adapter():
            return self._lotr(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._lotr, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward" and _is_fused_lm_head(self, value):
            self._lotr._adopt_fused_lm_head(value)  # the base model gets the fused head; this forward passes it on
            return
        super().__setattr__(name, value)


class LoTRModel(nn.Module):
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
        factor_owner: str | None = None,
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
        factor_owner: str | None = None,
    ) -> None:
        """Add adapter ``adapter``: its factors (or the ``shared`` ones, by group), a core in each layer, copies."""
        if adapter in self.lotr_configs:
            raise ValueError(f"the model already has an adapter {adapter!r}; adapters: {sorted(self.lotr_configs)}")
        self._check_layout(groups, source)
        self.lotr_configs[adapter] = config
        self.adapter_groups[adapter] = dict(groups)
        owner = factor_owner or adapter
        self._factor_keys[adapter] = {g: g if owner == DEFAULT_ADAPTER else f"{owner}--{g}" for g in groups}
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
        if name == "forward" and _is_fused_lm_head(self, value):
            self._adopt_fused_lm_head(value)
            return
        super().__setattr__(name, value)

    def _adopt_fused_lm_head(self, patched: types.MethodType) -> None:
        """Apply TRL's fused LM head to the base model, where its backbone and head are, instead of to this wrapper.

        TRL's ``add_fused_lm_head(model)`` replaces ``model.forward`` by a forward that, given
        ``fused_lm_head=True``, runs ``model.base_model`` as the transformer backbone (a
        transformers model's ``base_model``) and projects through ``model.get_output_embeddings()``.
        A ``LoTRModel``'s ``base_model`` is the whole model, so the patch goes to it, with the
        same options; this model's own forward passes ``fused_lm_head`` and the labels on.
        Anything else than TRL 1.16's patch raises ``TypeError`` pointing to ``LoTRPeftConfig``.
        """
        patch, options = _fused_lm_head_patch(patched)
        adopted = self._fused_lm_head
        if adopted is not None:  # the reference model of the same trainer, or another trainer
            if any(adopted[k] != options[k] for k in _FUSED_OPTIONS if k != "outputs"):
                detail = f"it was patched with other options already ({adopted}, now {options})"
                raise TypeError(_NO_FUSED_LM_HEAD.format(detail=detail))
            wanted = tuple(dict.fromkeys((*adopted["outputs"], *options["outputs"])))
            if wanted == tuple(adopted["outputs"]):
                return  # the fields asked for are computed already
            options = {**options, "outputs": wanted}  # one head computing every field either asks for
        text_config = getattr(getattr(self.base_model, "config", None), "get_text_config", None)
        if not callable(text_config) or not callable(getattr(self.base_model, "get_output_embeddings", None)):
            detail = f"the base model, a {type(self.base_model).__name__}, is not a transformers causal LM"
            raise TypeError(_NO_FUSED_LM_HEAD.format(detail=detail))
        patch(self.base_model, **options)
        self._fused_lm_head = options

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

    # --- the state dict: the adapters', as PEFT saves it ---------------------------------------
    def _adapter_tensor_ids(self) -> set[int]:
        """The ids of every adapter tensor: factors, cores, and the copies of ``modules_to_save``."""
        ids = {id(t) for t in (*self.lotr_factors.parameters(), *self.lotr_factors.buffers())}
        for _, layer in self.lotr_layers():
            ids.update(id(core) for core in layer.lotr_cores.values())
        for adapter in self.lotr_configs:
            ids.update(id(getattr(owner, attr)) for owner, attr in self._saved_slots(adapter).values())
        return ids

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The adapters' tensors, under this model's parameter names: never the frozen base weights.

        Every adapter's factors (once per group), cores and copies of ``modules_to_save``, as
        PEFT's ``get_peft_model_state_dict`` selects them (but keyed by this model's own
        parameter names, so that :meth:`load_state_dict` takes them back). This is what lets a
        plain ``transformers.Trainer`` write adapter-only checkpoints (it saves the
        ``state_dict()`` of a model that is no ``PreTrainedModel``) without tripping on weights
        the base shares (tied embeddings), and resume from them. The base model's own state
        dict is ``lotr.base_model.state_dict()``. Called by a parent module collecting its
        children's state (``destination`` given: a ``DistributedDataParallel`` wrapper, a
        container, FSDP), it contributes everything, as any module does.

        Examples
        --------
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
        >>> list(lotr.state_dict())  # a core per layer, and U and V once
        ['base_model.encoder.layer.0.attention.self.query.lotr_cores.default',
         'base_model.encoder.layer.1.attention.self.query.lotr_cores.default',
         'lotr_factors.query.out_factor', 'lotr_factors.query.in_factor']
        """
        if args or destination is not None:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        full = super().state_dict(prefix=prefix, keep_vars=True)
        ids = self._adapter_tensor_ids()
        out: Any = collections.OrderedDict()
        out._metadata = getattr(full, "_metadata", collections.OrderedDict())
        for key, value in full.items():
            if id(value) in ids:
                out[key] = value if keep_vars else value.detach()
        return out

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> _IncompatibleKeys:
        """Load a state dict of this model: :meth:`state_dict`'s (the adapters') or a whole one.

        ``strict`` applies to the adapters' tensors: a missing adapter tensor or an unexpected
        key raises ``RuntimeError``, missing base weights do not. Returns ``(missing_keys,
        unexpected_keys)`` with the missing adapter tensors only, as ``transformers.Trainer``
        reads it when it resumes. A tensor of another shape raises, as in torch.

        Examples
        --------
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> config = LoTRConfig(rank=4, target_modules=["query"])
        >>> lotr, other = get_lotr_model(BertModel(bert), config), get_lotr_model(BertModel(bert), config)
        >>> other.load_state_dict(lotr.state_dict())
        <All keys matched successfully>
        """
        expected = set(self.state_dict(keep_vars=True))
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [key for key in result.missing_keys if key in expected]
        unexpected = list(result.unexpected_keys)
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ".")
            if unexpected:
                parts.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + ".")
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(parts))
        return _IncompatibleKeys(missing, unexpected)

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
        statuses = []
        for name, layer in self.lotr_layers():
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
        for wrapper in self._wrappers():
            grads = collections.defaultdict(list)
            devices = collections.defaultdict(set)
            for adapter in wrapper.adapters:
                for owner, attr in wrapper.tensor_slots(adapter).values():
                    tensor = getattr(owner, attr)
                    grads[adapter].append(tensor.requires_grad)
                    devices[adapter].add(tensor.device.type)
            placed = self._in_place
            active = [placed] if placed in wrapper.adapters and placed in self._active else []
            statuses.append(
                TunerLayerStatus(
                    name=wrapper.path.removesuffix(".base_layer"),
                    module_type=type(wrapper).__name__,
                    enabled=self._enabled,
                    active_adapters=active,
                    merged_adapters=[],
                    requires_grad={a: _agree(v) for a, v in grads.items()},
                    available_adapters=sorted(wrapper.adapters),
                    devices={a: sorted(d) for a, d in devices.items()},
                    quantization_backend=None,
                )
            )
        return statuses

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
        layers = self.get_layer_status()
        trainable, total = self.get_nb_trainable_parameters()
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
            base_model_type=type(self.base_model).__name__, adapter_model_type=type(self).__name__,
            peft_types={name: "LOTR" for name in self.lotr_configs}, trainable_params=trainable, total_params=total,
            num_adapter_layers=len(layers), enabled=enabled.pop() if len(enabled) == 1 else "irregular",
            active_adapters=list(actives.pop()) if len(actives) == 1 else ([] if not actives else "irregular"),
            merged_adapters="irregular" if irregular_merge else merged_all,
            requires_grad={a: _agree(v) for a, v in grads.items()},
            available_adapters=sorted({a for status in layers for a in status.available_adapters}),
            devices={a: sorted(d) for a, d in devices.items()},
            quantization_backend=backends.pop() if len(backends) == 1 else ("irregular" if backends else None),
        )  # fmt: skip

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
        adapters, weights = list(adapters), [float(w) for w in weights]
        if not adapters or len(adapters) != len(weights):
            raise ValueError(f"give one weight per adapter: {len(adapters)} adapters, {len(weights)} weights")
        if combination_type not in ("linear", "cat"):
            raise ValueError(
                f"combination_type {combination_type!r} is not 'linear' or 'cat': LoTR combines adapters exactly, "
                "'linear' for adapters that share their factors (a weighted sum of cores), 'cat' for any adapters on "
                "the same groups (rank: the sum of their ranks)"
            )
        unknown = [a for a in adapters if a not in self.lotr_configs]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; adapters: {sorted(self.lotr_configs)}")
        check_adapter_name(adapter_name)
        if adapter_name in self.lotr_configs:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if any(self._has_copies(a) for a in adapters):
            raise ValueError("adapters with modules_to_save have no weighted sum of their full copies; leave them out")
        if any(layer.merged for _, layer in self.lotr_layers()):
            raise RuntimeError("unmerge_adapter() before add_weighted_adapter()")
        first = self.adapter_groups[adapters[0]]
        modules = {group: layout.modules for group, layout in first.items()}
        for other in adapters[1:]:
            if {group: layout.modules for group, layout in self.adapter_groups[other].items()} != modules:
                raise ValueError(f"adapters {adapters[0]!r} and {other!r} adapt different groups of modules")
        factors = {g: [self._factors(self._factor_keys[a][g]) for a in adapters] for g in first}
        config = copy.deepcopy(self.lotr_configs[adapters[0]])
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
            keys = {self._factor_keys[a][g] for a in adapters for g in first}
            key_owner = {k.partition("--")[0] if "--" in k else DEFAULT_ADAPTER for k in keys}
            if all(len({id(f) for f in found}) == 1 for found in factors.values()) and len(key_owner) == 1:
                shared = {g: found[0] for g, found in factors.items()}  # the very factors: held once
                owner = key_owner.pop()
            groups = {
                g: GroupLayout(list(x.modules), x.shape, x.rank, x.scale, x.fan_in_fan_out) for g, x in first.items()
            }
        else:
            groups = {}
            for g, layout in first.items():
                ranks = [self.adapter_groups[a][g].rank for a in adapters]
                rank = (sum(r[0] for r in ranks), sum(r[1] for r in ranks))
                check_rank(g, len(layout.modules), layout.shape, rank)
                groups[g] = GroupLayout(list(layout.modules), layout.shape, rank, layout.scale, layout.fan_in_fan_out)
            config.rank_pattern = {**config.rank_pattern, **{g: groups[g].rank for g in groups}}
        self._attach(
            adapter_name, config, groups, source=f"adapter {adapter_name!r}", initialise=False, shared=shared,
            factor_owner=owner,
        )  # fmt: skip
        with torch.no_grad():
            for g, layout in groups.items():
                target = self._factors(self._factor_keys[adapter_name][g])
                if shared is None and combination_type == "linear":
                    target.out_factor.copy_(factors[g][0].out_factor)
                    target.in_factor.copy_(factors[g][0].in_factor)
                elif shared is None:
                    target.out_factor.copy_(torch.cat([f.out_factor.to(target.out_factor) for f in factors[g]], dim=1))
                    target.in_factor.copy_(torch.cat([f.in_factor.to(target.in_factor) for f in factors[g]], dim=1))
                for name in layout.modules:
                    layer = self._layer(name)
                    work = torch.promote_types(layer.lotr_cores[adapter_name].dtype, torch.float32)
                    parts = [
                        w * layer.scales[a] * layer.lotr_cores[a].to(work)
                        for a, w in zip(adapters, weights, strict=True)
                    ]
                    core = torch.stack(parts).sum(0) if combination_type == "linear" else torch.block_diag(*parts)  # type: ignore[no-untyped-call]
                    layer.lotr_cores[adapter_name].copy_(core / layer.scales[adapter_name])
        self._set_trainable(adapter_name, False)

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

    # --- saving and loading (tensorlotr.nn.saving) ------------------------------------
    def adapter_files(self, adapter: str | None = None) -> LoTRAdapterFiles:
        """Adapter ``adapter``'s (default: the active one's) config, layout and tensors, as saved.

        Tensors sharded by FSDP2 (DTensors) are all-gathered, so every process must call this.
        Raises ``ValueError`` for a tensor on the meta device, which holds no data.
        """

        return saving.adapter_files(self, adapter)

    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        is_main_process: bool = True,
        selected_adapters: list[str] | None = None,
        push_to_hub: bool = False,
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
        safe_serialization: bool = True,
        save_embedding_layers: bool | str = "auto",
        **kwargs: Any,
    ) -> None:
        """Write each adapter as PEFT does: ``adapter_config.json``, ``adapter_model.safetensors`` and a model card.

        The folder is the LoTR PEFT method's (:mod:`tensorlotr.io.peft_lotr`): this class's
        :meth:`from_pretrained` loads it, and so does ``peft.PeftModel.from_pretrained`` after
        ``import tensorlotr``. ``adapter_config.json`` holds the config, PEFT's fields
        (``"peft_type": "LOTR"``) and ``lotr_layout``, the groups exactly as built, so that PEFT
        rebuilds this very adapter. A folder saved by an earlier version (``lotr_config.json``,
        ``lotr_model.safetensors``) is rewritten in this format and its two files removed.

        The adapter ``"default"`` goes in ``save_directory``, every other one in a subfolder
        named after it, as PEFT lays them out; ``selected_adapters`` picks some. Shared factors
        are stored once per group. Files are replaced atomically; other files in the folder are
        kept, and so is a model card the user has edited. In a multi-process run every process
        calls this (FSDP2 gathers the sharded tensors then) and only the one with
        ``is_main_process`` writes. ``push_to_hub=True`` then uploads the folder as
        :meth:`push_to_hub` does (``repo_id``, ``token``, ``private``, ``commit_message`` in ``kwargs``).
        The model card's loading snippet names the adapter by ``repo_id`` (given, or pushed to),
        the base model by its Hub id only, and loads it with the Auto class of the task.
        PEFT's and ``transformers.Trainer``'s keywords are taken: ``state_dict`` (this model's
        whole state dict, as Trainer gathers one under DeepSpeed or FSDP) is read instead of
        the model's tensors; the adapters are always written as safetensors
        (``safe_serialization``), and embeddings only as copies of ``modules_to_save``
        (``save_embedding_layers``).

        The weights file holds per group ``base_model.lotr_factors.<group>.out_factor``
        (d_out, r_out) and ``….in_factor`` (d_in, r_in), per adapted module
        ``base_model.model.<module>.lotr_cores`` (r_out, r_in), and the ``modules_to_save``
        tensors as ``base_model.model.<parameter>``: the keys PEFT saves for LoTR.

        Examples
        --------
        >>> from pathlib import Path
        >>> from safetensors.torch import load_file
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query", "value"]))
        >>> lotr.add_adapter("other", LoTRConfig(rank=2, target_modules=["query"]))
        >>> lotr.save_pretrained("my-adapter")  # "default" at the top, "other" in a subfolder
        >>> sorted(str(p.relative_to("my-adapter")) for p in Path("my-adapter").rglob("*.*"))
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors',
         'other/README.md', 'other/adapter_config.json', 'other/adapter_model.safetensors']
        >>> tensors = load_file("my-adapter/adapter_model.safetensors")
        >>> tuple(tensors["base_model.lotr_factors.query.out_factor"].shape)  # U (d_out, r_out)
        (32, 4)
        >>> tuple(tensors["base_model.model.encoder.layer.1.attention.self.query.lotr_cores"].shape)
        (4, 4)
        """

        saving.save_pretrained(
            self, save_directory, is_main_process, selected_adapters, push_to_hub, state_dict=state_dict,
            safe_serialization=safe_serialization, save_embedding_layers=save_embedding_layers, **kwargs,
        )  # fmt: skip

    def push_to_hub(
        self,
        repo_id: str,
        *,
        selected_adapters: list[str] | None = None,
        token: str | bool | None = None,
        private: bool | None = None,
        commit_message: str = "Upload LoTR adapter",
        **kwargs: Any,
    ) -> CommitInfo | Future[CommitInfo]:
        """Upload the adapters (never the base model) to the Hub repo ``repo_id``.

        The adapters are saved to a temporary folder as :meth:`save_pretrained` lays them out,
        then uploaded with ``create_repo`` and ``upload_folder``; their model cards name
        ``repo_id`` in the loading snippet. Offline it raises ``ConnectionError`` naming the repo.
        """

        return saving.push_to_hub(
            self, repo_id, selected_adapters=selected_adapters, token=token, private=private,
            commit_message=commit_message, **kwargs,
        )  # fmt: skip

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        adapter_dir: str | os.PathLike[str],
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
        *,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        torch_device: str | torch.device | None = None,
        **hub_kwargs: Any,
    ) -> LoTRModel:
        """Attach the adapter in ``adapter_dir`` (a folder or a Hub repo id) to ``model``, a fresh base.

        It reads the folder :meth:`save_pretrained` writes, the one ``PeftModel.save_pretrained``
        writes for a ``LoTRPeftConfig`` (its groups are then built on ``model`` from the modules
        the file holds cores for, as PEFT built them), and the earlier ``lotr_config.json``
        folders. A zoo folder attaches every adapter of the zoo, by its name, sharing the zoo's
        factors; the first is active. The adapter is frozen (its config's ``inference_mode``
        set) unless ``is_trainable``, as in PEFT. PEFT's keywords: ``torch_device`` is where the
        file is read to (the adapter then lives with the base weights, as in PEFT);
        ``autocast_adapter_dtype=False`` keeps an adapter without ``adapter_dtype`` in the base
        weights' dtype rather than float32; ``low_cpu_mem_usage`` changes nothing, a saved
        adapter being attached without initialising it. ``hub_kwargs`` (``subfolder``,
        ``revision``, ``token``, ``cache_dir``, ``local_files_only``) go to the Hub. Raises
        ``ValueError`` when the adapter does not fit the model (a missing module, another shape),
        for a PEFT LoRA folder, naming :meth:`from_lora` and ``tensorlotr convert``, and for a
        plain ``Trainer`` checkpoint, naming :meth:`load_adapter`.

        Examples
        --------
        Save an adapter of a 2-layer BERT of hidden size 32, then attach it to a fresh base of
        the same shapes:

        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, LoTRModel, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query", "value"]))
        >>> lotr.save_pretrained("my-adapter")
        >>> loaded = LoTRModel.from_pretrained(BertModel(bert), "my-adapter")  # frozen, in eval mode
        >>> loaded.groups["query"].shape, loaded.groups["query"].rank, loaded.get_nb_trainable_parameters()[0]
        ((32, 32), (4, 4), 0)
        >>> torch.equal(loaded.tucker("query").out_factor, lotr.tucker("query").out_factor)  # U (32, 4)
        True
        >>> LoTRModel.from_pretrained(BertModel(bert), "my-adapter", is_trainable=True).get_nb_trainable_parameters()[0]
        576
        """

        return saving.from_pretrained(
            cls, model, adapter_dir, adapter_name, is_trainable, autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage, torch_device=torch_device, **hub_kwargs,
        )  # fmt: skip

    @classmethod
    def from_adapter_files(
        cls,
        model: nn.Module,
        files: LoTRAdapterFiles,
        is_trainable: bool = False,
        source: str = "the adapter",
        adapter_name: str = DEFAULT_ADAPTER,
    ) -> LoTRModel:
        """Attach an adapter held in memory (as ``decompose`` returns it) to ``model``."""

        return saving.from_adapter_files(cls, model, files, is_trainable, source, adapter_name)

    @classmethod
    def from_zoo(
        cls, model: nn.Module, zoo: ZooFiles, is_trainable: bool = False, source: str = "the zoo"
    ) -> LoTRModel:
        """Attach every adapter of a zoo (:class:`tensorlotr.adapter.layout.ZooFiles`), factors held once."""

        return saving.from_zoo(cls, model, zoo, is_trainable, source)

    @classmethod
    def from_lora(
        cls,
        model: nn.Module,
        peft_dir: str | os.PathLike[str],
        *,
        rank: int | tuple[int, int] | None = None,
        energy: float | None = None,
        n_iter: int = 0,
        adapter_name: str = DEFAULT_ADAPTER,
        is_trainable: bool = False,
        **hub_kwargs: Any,
    ) -> LoTRModel:
        """Convert a PEFT LoRA (a folder or a Hub repo id) to LoTR in memory and attach it to ``model``.

        ``rank``, ``energy`` and ``n_iter`` are :func:`tensorlotr.convert_lora`'s; the conversion
        (:class:`tensorlotr.adapter.lora.LoRAConversion`: per group, the ranks, parameters and
        errors) is ``lotr.conversion_report``.

        Examples
        --------
        ``my-lora/`` holds a PEFT LoRA of rank 4 on ``q_proj`` and ``v_proj`` of a 2-layer Llama
        of hidden size 32: each group's LoRA is two (32, 4) ``B`` and two (4, 32) ``A``, 512
        parameters; at rank 4, LoTR keeps ``U`` (32, 4), ``V`` (32, 4) and two (4, 4) cores, 288.

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from tensorlotr import LoTRModel
        >>> llama = LlamaConfig(
        ...     vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        ...     num_key_value_heads=4, max_position_embeddings=32,
        ... )
        >>> lotr = LoTRModel.from_lora(LlamaForCausalLM(llama), "my-lora", rank=4)
        >>> [(g.group, g.rank, g.lora_params, g.lotr_params) for g in lotr.conversion_report.groups]
        [('q_proj', (4, 4), 512, 288), ('v_proj', (4, 4), 512, 288)]
        >>> lotr.groups["q_proj"].shape, lotr.active_adapter
        ((32, 32), 'default')
        """

        return saving.from_lora(
            cls, model, peft_dir, rank=rank, energy=energy, n_iter=n_iter, adapter_name=adapter_name,
            is_trainable=is_trainable, **hub_kwargs,
        )  # fmt: skip

    @classmethod
    def from_peft_model(
        cls,
        peft_model: nn.Module,
        config: LoTRConfig | None = None,
        *,
        rank: int | tuple[int, int] | None = None,
        is_trainable: bool = True,
    ) -> LoTRModel:
        """Convert a live PEFT LoRA model to LoTR in memory: the second half of a LoRA warm-up.

        Each group's stack ``dW_l = scale_l B_l A_l`` is decomposed in factored form
        (:func:`tensorlotr.tucker2_lowrank`, HOSVD) at the group's rank; the LoRA layers
        are removed from the base model (PEFT's ``unload``: the trained copies of
        ``modules_to_save`` stay) and a LoTR adapter set to the decomposition is attached.
        Where the stack's exact rank is below the requested one, the factors get random
        orthonormal columns with zero cores, so the model still computes the LoRA's
        function and every direction can train. ``peft_model`` is consumed.

        Parameters
        ----------
        peft_model : peft.PeftModel
            With a LoRA adapter (its active one; not DoRA, not merged).
        config : LoTRConfig, optional
            Must target exactly modules the LoRA adapts. Default: ``rank`` (or the LoRA's
            ``r``), ``alpha = lora_alpha``, the LoRA's modules and ``modules_to_save``.
        rank : int or (r_out, r_in), optional
            The ranks of the default config.
        is_trainable : bool
            Leave the adapter trainable (the default, to go on training) or freeze it.

        Returns
        -------
        LoTRModel
            ``conversion_errors`` holds each group's relative error of the conversion.

        Examples
        --------
        A PEFT LoRA of rank 2 on the two ``query`` layers of a BERT of hidden size 32, its
        ``B`` set at random (as after some training), then LoTR at rank 4, the exact rank
        of the two-layer stack, which computes the same function:

        >>> import peft, torch
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRModel
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lora = peft.get_peft_model(BertModel(bert).eval(), peft.LoraConfig(r=2, target_modules=["query"]))
        >>> for name, p in lora.named_parameters():
        ...     if "lora_B" in name:
        ...         _ = torch.nn.init.normal_(p, std=0.1)
        >>> x = torch.tensor([[1, 2, 3]])
        >>> expected = lora(input_ids=x).last_hidden_state
        >>> lotr = LoTRModel.from_peft_model(lora, rank=4).eval()
        >>> list(lotr.groups), lotr.groups["query"].rank, lotr.conversion_errors["query"] < 1e-6
        (['query'], (4, 4), True)
        >>> torch.allclose(lotr(input_ids=x).last_hidden_state, expected, atol=1e-5)
        True
        """

        return lotr_from_peft_model(cls, peft_model, config, rank=rank, is_trainable=is_trainable)

    def load_adapter(
        self,
        adapter_dir: str | os.PathLike[str],
        adapter_name: str | None = None,
        is_trainable: bool = False,
        *,
        torch_device: str | torch.device | None = None,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        **hub_kwargs: Any,
    ) -> None:
        """Load a saved adapter (a folder or a Hub repo id), in any format :meth:`from_pretrained` reads.

        With a new ``adapter_name`` it is added as a named adapter, inactive (as in PEFT). With
        ``adapter_name=None`` or an existing name, its tensors are loaded into that adapter,
        which must have the same layout (resuming from a checkpoint). A plain
        ``transformers.Trainer`` checkpoint of this model (``model.safetensors``, its
        :meth:`state_dict`) is loaded that way too. PEFT's keywords are those of :meth:`from_pretrained`.

        Examples
        --------
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query", "value"]))
        >>> lotr.save_pretrained("my-adapter")
        >>> lotr.load_adapter("my-adapter", adapter_name="saved")  # a second adapter, inactive
        >>> sorted(lotr.lotr_configs), lotr.active_adapters
        (['default', 'saved'], ['default'])
        >>> lotr.load_adapter("my-adapter")  # into the active adapter, as when resuming
        """

        saving.load_adapter(
            self, adapter_dir, adapter_name, is_trainable, torch_device=torch_device,
            autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage, **hub_kwargs,
        )  # fmt: skip

    def get_adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """Adapter ``adapter_name``'s (default: the active one's) tensors keyed as PEFT saves them.

        :func:`tensorlotr.nn.saving.get_peft_model_state_dict` (also ``tensorlotr.nn.get_peft_model_state_dict``)
        does it; the keys are those of ``adapter_model.safetensors``, without the adapter's name.

        Examples
        --------
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
        >>> sorted(lotr.get_adapter_state_dict())[0]
        'base_model.lotr_factors.query.in_factor'
        """
        return saving.get_peft_model_state_dict(self, adapter_name=adapter_name or self.active_adapter)

    def load_adapter_state_dict(
        self, state_dict: dict[str, torch.Tensor], adapter_name: str | None = None
    ) -> _IncompatibleKeys:
        """Copy a state dict keyed as :meth:`get_adapter_state_dict`'s into adapter ``adapter_name`` (default: active).

        Returns ``(missing_keys, unexpected_keys)``; see
        :func:`tensorlotr.nn.saving.set_peft_model_state_dict`.

        Examples
        --------
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> config = LoTRConfig(rank=4, target_modules=["query"])
        >>> lotr, other = get_lotr_model(BertModel(bert), config), get_lotr_model(BertModel(bert), config)
        >>> other.load_adapter_state_dict(lotr.get_adapter_state_dict())
        <All keys matched successfully>
        """
        return saving.set_peft_model_state_dict(self, state_dict, adapter_name=adapter_name or self.active_adapter)

    def hotswap_adapter(
        self,
        model_name_or_path: str | os.PathLike[str],
        adapter_name: str = DEFAULT_ADAPTER,
        torch_device: str | torch.device | None = None,
        **hub_kwargs: Any,
    ) -> None:
        """Replace adapter ``adapter_name``'s tensors in place by a saved adapter's, without recompiling.

        As PEFT's ``hotswap_adapter``: same groups and modules, ranks no larger (padded with
        zeros), scales folded into the cores; see :func:`tensorlotr.nn.saving.hotswap_adapter`.

        Examples
        --------
        >>> from transformers import BertConfig, BertModel
        >>> from tensorlotr import LoTRConfig, get_lotr_model
        >>> bert = BertConfig(
        ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
        ... )
        >>> config = LoTRConfig(rank=4, target_modules=["query"])
        >>> get_lotr_model(BertModel(bert), config).save_pretrained("my-adapter")
        >>> lotr = get_lotr_model(BertModel(bert), config)
        >>> core = lotr.lotr_layers().__next__()[1].lotr_core
        >>> lotr.hotswap_adapter("my-adapter")
        >>> lotr.lotr_layers().__next__()[1].lotr_core is core  # the same tensor, new values
        True
        """
        saving.hotswap_adapter(self, model_name_or_path, adapter_name, torch_device, **hub_kwargs)

    def load_adapter_tensors(
        self, files: LoTRAdapterFiles, source: str = "adapter", adapter: str | None = None
    ) -> None:
        """Copy the tensors of ``files`` into adapter ``adapter`` (default: the active one).

        An adapter tensor on the meta device (the base was built under ``init_empty_weights``,
        say) is replaced by the file's, on the CPU in the adapter tensor's dtype. Raises
        ``ValueError`` for a tensor of the wrong shape, a ``modules_to_save`` tensor the model
        lacks, and an adapter tensor the file does not hold that would stay on the meta device.
        """

        saving.load_adapter_tensors(self, files, source, adapter)


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
