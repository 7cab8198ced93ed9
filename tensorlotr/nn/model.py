"""``LoTRModel``: a transformers model with LoTR adapters, and ``get_lotr_model``."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..adapter import LoTRConfig
from ..adapter.groups import is_conv1d
from ..adapter.layout import IN_FACTOR, OUT_FACTOR, GroupLayout, LoTRAdapterFiles, core_key, factor_key, saved_key
from ..core import Tucker2, tucker2
from .layer import LoTRFactors, LoTRLayer, share_input_products
from .targets import build_groups, dense_weight, is_supported, resolve_modules_to_save, resolve_targets, weight_shape


def _split_name(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def _bound_forward(lotr: LoTRModel, model: nn.Module) -> functools.partial:
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
            f"the model is already a LoTRModel with adapter groups {sorted(model.groups)}; attach a new adapter "
            "to a fresh base model, or remove this one first with unload() or merge_and_unload()"
        )
    adapted = [(name, module) for name, module in model.named_modules() if isinstance(module, LoTRLayer)]
    if adapted:
        ranks = sorted({module.factors.rank for _, module in adapted})
        names = ", ".join(repr(name) for name, _ in adapted[:3]) + (", ..." if len(adapted) > 3 else "")
        raise ValueError(
            f"the model already carries a LoTR adapter: {len(adapted)} LoTRLayer modules ({names}) of rank "
            f"{', '.join(map(str, ranks))}; attach a new adapter to a fresh base model, or remove the existing one "
            "first with unload() or merge_and_unload() on its LoTRModel"
        )


def _check_rank(group: str, n_layers: int, shape: tuple[int, int], rank: tuple[int, int]) -> None:
    """Refuse a rank above the largest a stack of ``n_layers`` matrices of ``shape`` (d_out, d_in) can have."""
    (d_out, d_in), (r_out, r_in) = shape, rank
    max_out, max_in = min(d_out, n_layers * d_in), min(d_in, n_layers * d_out)
    if r_out > max_out or r_in > max_in:
        raise ValueError(
            f"group {group!r} ({n_layers} layers of {d_out}x{d_in}, d_out x d_in) cannot take rank ({r_out}, {r_in}): "
            f"the largest sensible rank is ({max_out}, {max_in}) = (min(d_out, L*d_in), min(d_in, L*d_out)); "
            f"lower rank, or set rank_pattern[{group!r}]"
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


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor``: a DTensor (FSDP2) is all-gathered, a collective every process must join."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return tensor.full_tensor()
    return tensor


class LoTRModel(nn.Module):
    """A model whose targeted Linear / Conv1D layers carry LoTR adapters.

    The base model's parameters are frozen. Each group's factors ``U`` and ``V`` are
    registered once, in ``lotr_factors``; each adapted layer owns its core. Each module of
    ``modules_to_save`` is replaced in the base model by a trainable copy, and the original
    is kept, frozen, in ``original_modules`` (PEFT's ``ModulesToSaveWrapper`` semantics).
    Attributes the wrapper lacks are looked up on the base model, as with PEFT's ``PeftModel``.

    Build it with :func:`get_lotr_model` or :meth:`from_pretrained`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: LoTRConfig,
        *,
        layout: dict[str, GroupLayout] | None = None,
        source: str = "the adapter",
    ) -> None:
        _refuse_adapted(model)
        initialise = layout is None
        groups = self._plan(model, config) if layout is None else layout
        if initialise and config.init == "svd":
            _refuse_meta_weights(model, groups)
        super().__init__()
        self.base_model = model
        self.lotr_config = config
        self.lotr_factors = nn.ModuleDict()
        for param in model.parameters():
            param.requires_grad_(False)
        self.groups: dict[str, GroupLayout] = groups
        self._check_layout(model, source)
        self._inject(initialise)
        self.modules_to_save = resolve_modules_to_save(model, config.modules_to_save)
        self.original_modules = nn.ModuleList()
        self._copy_paths: list[str] = []
        self._copy_modules_to_save()
        for tensor in self._saved_tensors().values():
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(True)
        self.forward = _bound_forward(self, model)

    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        """Run the base model with its adapters; ``labels`` are passed on when given.

        Naming ``labels`` here lets ``transformers.Trainer`` find the labels in the class's
        signature, so ``evaluate()`` computes ``eval_loss``. Each instance's ``forward`` is
        this method bound, with the base model's signature (see :func:`_bound_forward`).
        """
        if labels is not None:
            kwargs["labels"] = labels
        return self.base_model(*args, **kwargs)

    # --- construction -------------------------------------------------------------
    @staticmethod
    def _plan(model: nn.Module, config: LoTRConfig) -> dict[str, GroupLayout]:
        """The groups ``config`` makes of ``model``; ranks the shapes cannot take are refused before any tensor."""
        names = resolve_targets(model, config)
        groups = build_groups(model, names, config)
        for g in groups:
            _check_rank(g.name, len(g.modules), g.shape, config.rank_of(g.name, g.modules))
        return {
            g.name: GroupLayout(
                list(g.modules),
                g.shape,
                config.rank_of(g.name, g.modules),
                config.scale_of(g.name, g.modules),
                fan_in_fan_out=is_conv1d(model.get_submodule(g.modules[0])),
            )
            for g in groups
        }

    def _check_layout(self, model: nn.Module, source: str) -> None:
        modules = dict(model.named_modules())
        for group_name, group in self.groups.items():
            for name in group.modules:
                module = modules.get(name)
                if module is None:
                    raise ValueError(f"{source} adapts module {name!r} (group {group_name!r}), which the model lacks")
                if not is_supported(module):
                    raise ValueError(f"{source} adapts module {name!r}, a {type(module).__name__}, not Linear/Conv1D")
                if weight_shape(module) != tuple(group.shape):
                    d_out, d_in = weight_shape(module)
                    raise ValueError(
                        f"{source} expects module {name!r} of shape {group.shape[0]}x{group.shape[1]} "
                        f"(d_out x d_in), but the model's is {d_out}x{d_in}"
                    )

    def _inject(self, initialise: bool) -> None:
        for group_name, group in self.groups.items():
            first = self.base_model.get_submodule(group.modules[0])
            dtype = torch.float64 if first.weight.dtype == torch.float64 else torch.float32
            if self.lotr_config.adapter_dtype is not None:
                dtype = getattr(torch, self.lotr_config.adapter_dtype)
            factors = LoTRFactors(*group.shape, group.rank, dtype=dtype).to(first.weight.device)
            if initialise:
                self._initialise(factors, group)
            self.lotr_factors[group_name] = factors
            for name in group.modules:
                parent_name, child = _split_name(name)
                parent = self.base_model.get_submodule(parent_name)
                layer = LoTRLayer(getattr(parent, child), factors, group.scale, self.lotr_config.dropout)
                setattr(parent, child, layer.to(first.weight.device))
        self._sharing_hooks = share_input_products(self.base_model)

    def _initialise(self, factors: LoTRFactors, group: GroupLayout) -> None:
        init = self.lotr_config.init
        if init == "normal":
            factors.reset_normal()
        elif init == "svd":
            stack = torch.stack([self._dense_weight(self.base_model.get_submodule(n)) for n in group.modules]).to(
                torch.float64
            )
            decomposition = tucker2(stack, group.rank)
            with torch.no_grad():
                factors.reset_orthonormal()  # fills columns a small stack cannot
                r_out, r_in = decomposition.rank
                factors.out_factor[:, :r_out] = decomposition.out_factor.to(factors.out_factor.dtype)
                factors.in_factor[:, :r_in] = decomposition.in_factor.to(factors.in_factor.dtype)

    @staticmethod
    def _dense_weight(module: nn.Module) -> torch.Tensor:
        return dense_weight(module).detach()

    def _copy_modules_to_save(self) -> None:
        """Put a trainable copy of each module of ``modules_to_save`` in its place; keep the original aside.

        Training changes only the copy, so :meth:`disable_adapter` can run the original, and
        a weight the original shares with another module (a GPT-2 or Llama ``lm_head`` tied
        to the input embeddings) is never changed through it. For an adapted module the copy
        is of its base layer and shares the frozen weight: only its other tensors (a bias) train.
        """
        for name in self.modules_to_save:
            path, module = name, self.base_model.get_submodule(name)
            shared: dict[int, Any] = {}
            if isinstance(module, LoTRLayer):
                path, module = f"{name}.base_layer", module.base_layer
                shared[id(module.weight)] = module.weight
            inner = [f"{path}.{n}" for n, m in module.named_modules() if isinstance(m, LoTRLayer)]
            if inner:
                raise ValueError(
                    f"modules_to_save names {name!r}, which contains adapted modules ({', '.join(inner[:3])}); "
                    "list its other submodules instead, or leave them out of target_modules"
                )
            self._swap(path, copy.deepcopy(module, shared))
            self.original_modules.append(module)
            self._copy_paths.append(path)

    def _swap(self, path: str, module: nn.Module) -> nn.Module:
        """Put ``module`` at ``path`` in the base model; return the module it replaces."""
        parent_name, child = _split_name(path)
        parent = self.base_model.get_submodule(parent_name)
        previous = getattr(parent, child)
        setattr(parent, child, module)
        return previous

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base_model", "lotr_factors", "original_modules"}:
                raise
            return getattr(self.base_model, name)

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

    def tucker(self, group: str) -> Tucker2:
        """The group's update as a :class:`tensorlotr.Tucker2`: ``dW_l = U (scale G_l) V^T``.

        The tensors are detached copies: core (L, r_out, r_in), U (d_out, r_out), V (d_in, r_in).
        """
        layout, factors = self._group(group)
        cores = torch.stack([self.base_model.get_submodule(n).lotr_core.detach() for n in layout.modules])
        return Tucker2(layout.scale * cores, factors.out_factor.detach().clone(), factors.in_factor.detach().clone())

    @torch.no_grad()
    def load_tucker(self, group: str, tucker: Tucker2) -> None:
        """Set a group's factors and cores from a Tucker2 of the same shape and rank."""
        layout, factors = self._group(group)
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
            self.base_model.get_submodule(name).lotr_core.copy_(core[i] / layout.scale)

    def _group(self, group: str) -> tuple[GroupLayout, LoTRFactors]:
        if group not in self.groups:
            raise KeyError(f"no group {group!r}; groups: {list(self.groups)}")
        return self.groups[group], self.lotr_factors[group]

    # --- adapter on/off, merging ------------------------------------------------------
    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the base model without the adapters inside the ``with`` block.

        The original ``modules_to_save`` run in place of their trained copies, as in PEFT.
        """
        layers = [layer for _, layer in self.lotr_layers()]
        if any(layer.merged for layer in layers):
            raise RuntimeError("unmerge_adapter() before disable_adapter(): merged weights cannot be switched off")
        states = [layer.active for layer in layers]
        for layer in layers:
            layer.active = False
        originals = zip(self._copy_paths, self.original_modules, strict=True)
        copies = [self._swap(path, original) for path, original in originals]
        try:
            yield
        finally:
            for path, trained in zip(self._copy_paths, copies, strict=True):
                self._swap(path, trained)
            for layer, state in zip(layers, states, strict=True):
                layer.active = state

    def merge_adapter(self) -> None:
        """Add every update into its base weight; forward then costs what the base costs."""
        for _, layer in self.lotr_layers():
            layer.merge()

    def unmerge_adapter(self) -> None:
        """Subtract merged updates again, restoring the base weights."""
        for _, layer in self.lotr_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the updates and return the plain base model, without adapter layers."""
        self.merge_adapter()
        return self.unload()

    def unload(self) -> nn.Module:
        """Return the base model with the adapter layers removed (merged ones stay merged).

        The trained copies of ``modules_to_save`` stay in the model and the originals are dropped, as in PEFT.
        """
        for name, layer in list(self.lotr_layers()):
            self._swap(name, layer.base_layer)
        for handle in self._sharing_hooks:
            handle.remove()
        self._sharing_hooks = []
        self.lotr_factors = nn.ModuleDict()
        self.original_modules = nn.ModuleList()
        self._copy_paths = []
        return self.base_model

    # --- saving and loading ---------------------------------------------------------
    def _saved_paths(self) -> dict[str, str]:
        """The paths in the base model of the ``modules_to_save`` tensors (their trained copies), by plain path.

        An adapted module may be listed too (its bias changed in a full fine-tune, say):
        then its other tensors are saved under their plain names (``….dense.bias``) and its
        frozen base weight and core are left out.
        """
        names = [name for name, _ in self.base_model.named_parameters(remove_duplicate=False)]
        names += [name for name, _ in self.base_model.named_buffers(remove_duplicate=False)]
        adapted = {name for name, _ in self.lotr_layers()}
        out = {}
        for module_name in self.modules_to_save:
            prefix = module_name + "."
            for name in names:
                if not name.startswith(prefix) or name.endswith(".lotr_core"):
                    continue
                if module_name in adapted and name == prefix + "base_layer.weight":
                    continue
                out[name.replace(".base_layer.", ".")] = name
        return out

    def _saved_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of ``modules_to_save`` (their trained copies) by plain parameter path."""
        return {key: getattr(*self._slot(path)) for key, path in self._saved_paths().items()}

    def _slot(self, path: str) -> tuple[nn.Module, str]:
        """The module of the base model that holds the tensor at ``path``, and the tensor's attribute name."""
        owner, _, attr = path.rpartition(".")
        return self.base_model.get_submodule(owner), attr

    def _adapter_slots(self) -> dict[str, tuple[nn.Module, str]]:
        """Every adapter tensor by its key in :class:`LoTRAdapterFiles`, as (owning module, attribute name)."""
        slots: dict[str, tuple[nn.Module, str]] = {}
        for group_name, factors in self.lotr_factors.items():
            slots[factor_key(group_name, OUT_FACTOR)] = (factors, "out_factor")
            slots[factor_key(group_name, IN_FACTOR)] = (factors, "in_factor")
        for name, layer in self.lotr_layers():
            slots[core_key(name)] = (layer, "lotr_core")
        for key, path in self._saved_paths().items():
            slots[saved_key(key)] = self._slot(path)
        return slots

    def adapter_files(self) -> LoTRAdapterFiles:
        """The adapter's config, layout and tensors, as written by :meth:`save_pretrained`.

        Tensors sharded by FSDP2 (DTensors) are all-gathered, so every process must call this.
        Raises ``ValueError`` for a tensor on the meta device, which holds no data.
        """
        tensors: dict[str, torch.Tensor] = {}
        for key, (owner, attr) in self._adapter_slots().items():
            tensor = _gathered(getattr(owner, attr))
            if tensor.is_meta:
                raise ValueError(
                    f"adapter tensor {key!r} is on the meta device and holds no data; load the adapter "
                    "(from_pretrained, load_adapter) or build it on a base model with weights before saving it"
                )
            tensors[key] = tensor
        base_config = getattr(self.base_model, "config", None)
        base = {
            "model_type": getattr(base_config, "model_type", None),
            "name_or_path": getattr(base_config, "_name_or_path", None),
            "class": type(self.base_model).__name__,
        }
        return LoTRAdapterFiles(self.lotr_config.to_dict(), dict(self.groups), tensors, base)

    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True, **_: Any) -> None:
        """Write ``lotr_config.json`` and ``lotr_model.safetensors`` into ``save_directory``.

        Shared factors are stored once per group. Files are replaced atomically; other
        files in the folder are kept (as PEFT does). In a multi-process run every process
        calls this (FSDP2 gathers the sharded tensors then) and only the one with
        ``is_main_process`` writes.
        """
        if any(layer.merged for _, layer in self.lotr_layers()):
            raise RuntimeError("unmerge_adapter() before save_pretrained(): the cores are saved separately")
        files = self.adapter_files()
        if is_main_process:
            from ..io.lotr_format import write_adapter  # the file format lives in io; the model hands it data

            write_adapter(save_directory, files)

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: str | os.PathLike, is_trainable: bool = False) -> LoTRModel:
        """Attach the adapter saved in ``adapter_dir`` to ``model`` (a fresh base model).

        Raises ``ValueError`` when the adapter does not fit the model: a missing module
        or a shape that differs, named with both shapes.
        """
        from ..io.lotr_format import read_adapter

        return cls.from_adapter_files(model, read_adapter(adapter_dir), is_trainable, source=f"adapter {adapter_dir}")

    @classmethod
    def from_adapter_files(
        cls, model: nn.Module, files: LoTRAdapterFiles, is_trainable: bool = False, source: str = "the adapter"
    ) -> LoTRModel:
        """Attach an adapter held in memory (as ``decompose`` returns it) to ``model``."""
        config = LoTRConfig.from_dict(files.config)
        lotr = cls(model, config, layout=files.groups, source=source)
        lotr.load_adapter_tensors(files, source=source)
        for tensor in lotr._saved_tensors().values():
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(is_trainable)
        for param in lotr.lotr_factors.parameters():
            param.requires_grad_(is_trainable)
        for _, layer in lotr.lotr_layers():
            layer.lotr_core.requires_grad_(is_trainable)
        if not is_trainable:
            lotr.eval()
        return lotr

    def load_adapter(self, adapter_dir: str | os.PathLike) -> None:
        """Load the tensors of a saved adapter with the same layout into this model (resuming)."""
        from ..io.lotr_format import read_adapter

        files = read_adapter(adapter_dir)
        if {k: v.to_dict() for k, v in files.groups.items()} != {k: v.to_dict() for k, v in self.groups.items()}:
            raise ValueError(f"adapter {adapter_dir} has another layout than this model's adapter")
        self.load_adapter_tensors(files, source=str(adapter_dir))

    @torch.no_grad()
    def load_adapter_tensors(self, files: LoTRAdapterFiles, source: str = "adapter") -> None:
        """Copy the tensors of ``files`` into the adapter.

        An adapter tensor on the meta device (the base was built under ``init_empty_weights``,
        say) is replaced by the file's, on the CPU in the adapter tensor's dtype. Raises
        ``ValueError`` for a tensor of the wrong shape, a ``modules_to_save`` tensor the model
        lacks, and an adapter tensor the file does not hold that would stay on the meta device.
        """
        slots = self._adapter_slots()
        optional = {saved_key(k) for k in self._saved_paths()}  # a saved module's tensor the file leaves out stays
        for key in files.modules_to_save:
            if saved_key(key) not in slots:
                raise ValueError(
                    f"{source} saves {key!r} (modules_to_save), which the model lacks or which is in none of "
                    f"its modules_to_save {self.modules_to_save}"
                )
        loads = []
        for key, (owner, attr) in slots.items():
            current, value = getattr(owner, attr), files.tensors.get(key)
            if value is None:
                if key in optional:
                    continue
                raise ValueError(f"{source} lacks tensor {key!r}")
            if tuple(current.shape) != tuple(value.shape):
                raise ValueError(
                    f"{source} holds {key!r} of shape {tuple(value.shape)}, but the model's is {tuple(current.shape)}"
                )
            loads.append((owner, attr, current, value))
        for owner, attr, current, value in loads:  # nothing changes unless every tensor fits
            if current.is_meta:
                value = value.detach().to(dtype=current.dtype).clone()
                is_param = isinstance(current, nn.Parameter)
                setattr(owner, attr, nn.Parameter(value, requires_grad=current.requires_grad) if is_param else value)
            else:
                current.copy_(value)
        left = [key for key, (owner, attr) in slots.items() if getattr(owner, attr).is_meta]
        if left:
            raise ValueError(
                f"{source} holds no values for {len(left)} adapter tensors on the meta device "
                f"({', '.join(left[:3])}); load the base model's weights before attaching the adapter"
            )


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
    """
    return LoTRModel(model, config)
