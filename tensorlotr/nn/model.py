"""``LoTRModel``: a transformers model with LoTR adapters, and ``get_lotr_model``."""

from __future__ import annotations

import contextlib
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


def _call_base(lotr: LoTRModel, *args: Any, **kwargs: Any) -> Any:
    return lotr.base_model(*args, **kwargs)


def _bound_forward(lotr: LoTRModel, model: nn.Module) -> functools.partial:
    """``lotr``'s forward, carrying the base model's signature so ``Trainer`` keeps the right inputs."""
    forward = functools.partial(_call_base, lotr)
    with contextlib.suppress(TypeError, ValueError):  # a forward without a signature keeps (*args, **kwargs)
        forward.__signature__ = inspect.signature(model.forward)  # type: ignore[attr-defined]
    return forward


class LoTRModel(nn.Module):
    """A model whose targeted Linear / Conv1D layers carry LoTR adapters.

    The base model's parameters are frozen. Each group's factors ``U`` and ``V`` are
    registered once, in ``lotr_factors``; each adapted layer owns its core. Attributes
    the wrapper lacks are looked up on the base model, as with PEFT's ``PeftModel``.

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
        super().__init__()
        self.base_model = model
        self.lotr_config = config
        self.lotr_factors = nn.ModuleDict()
        for param in model.parameters():
            param.requires_grad_(False)
        initialise = layout is None
        self.groups: dict[str, GroupLayout] = self._plan(model, config) if layout is None else layout
        self._check_layout(model, source)
        self._inject(initialise)
        self.modules_to_save = resolve_modules_to_save(model, config.modules_to_save)
        for tensor in self._saved_tensors().values():
            if isinstance(tensor, nn.Parameter):
                tensor.requires_grad_(True)
        self.forward = _bound_forward(self, model)

    # --- construction -------------------------------------------------------------
    @staticmethod
    def _plan(model: nn.Module, config: LoTRConfig) -> dict[str, GroupLayout]:
        names = resolve_targets(model, config)
        return {
            g.name: GroupLayout(
                list(g.modules),
                g.shape,
                config.rank_of(g.name),
                config.scale_of(g.name),
                fan_in_fan_out=is_conv1d(model.get_submodule(g.modules[0])),
            )
            for g in build_groups(model, names, config)
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

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base_model", "lotr_factors"}:
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

        ``modules_to_save`` are trained in place, so they stay as trained.
        """
        layers = [layer for _, layer in self.lotr_layers()]
        if any(layer.merged for layer in layers):
            raise RuntimeError("unmerge_adapter() before disable_adapter(): merged weights cannot be switched off")
        states = [layer.active for layer in layers]
        for layer in layers:
            layer.active = False
        try:
            yield
        finally:
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
        """Return the base model with the adapter layers removed (merged ones stay merged)."""
        for name, layer in list(self.lotr_layers()):
            parent_name, child = _split_name(name)
            setattr(self.base_model.get_submodule(parent_name), child, layer.base_layer)
        for handle in self._sharing_hooks:
            handle.remove()
        self._sharing_hooks = []
        self.lotr_factors = nn.ModuleDict()
        return self.base_model

    # --- saving and loading ---------------------------------------------------------
    def _saved_tensors(self, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The tensors of ``modules_to_save`` by parameter path in the base model.

        An adapted module may be listed too (its bias changed in a full fine-tune, say):
        then its other tensors are saved under their plain names (``….dense.bias``) and its
        frozen base weight and core are left out. With ``keys``, exactly those are resolved.
        """
        own = dict(self.base_model.named_parameters())
        own.update(dict(self.base_model.named_buffers()))
        adapted = {name for name, _ in self.lotr_layers()}

        def plain(key: str) -> str:
            return key.replace(".base_layer.", ".")

        if keys is not None:
            by_plain = {plain(k): v for k, v in own.items() if not k.endswith(".lotr_core")}
            return {k: by_plain[k] for k in keys if k in by_plain}
        out = {}
        for module_name in self.modules_to_save:
            prefix = module_name + "."
            for key, tensor in own.items():
                if not key.startswith(prefix) or key.endswith(".lotr_core"):
                    continue
                if module_name in adapted and key == prefix + "base_layer.weight":
                    continue
                out[plain(key)] = tensor
        return out

    def adapter_files(self) -> LoTRAdapterFiles:
        """The adapter's config, layout and tensors, as written by :meth:`save_pretrained`."""
        tensors: dict[str, torch.Tensor] = {}
        for group_name, factors in self.lotr_factors.items():
            tensors[factor_key(group_name, OUT_FACTOR)] = factors.out_factor
            tensors[factor_key(group_name, IN_FACTOR)] = factors.in_factor
        for name, layer in self.lotr_layers():
            tensors[core_key(name)] = layer.lotr_core
        for key, tensor in self._saved_tensors().items():
            tensors[saved_key(key)] = tensor
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
        files in the folder are kept (as PEFT does).
        """
        if any(layer.merged for _, layer in self.lotr_layers()):
            raise RuntimeError("unmerge_adapter() before save_pretrained(): the cores are saved separately")
        if is_main_process:
            from ..io.lotr_format import write_adapter  # the file format lives in io; the model hands it data

            write_adapter(save_directory, self.adapter_files())

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
        for group_name, factors in self.lotr_factors.items():
            factors.out_factor.copy_(files.factor(group_name, OUT_FACTOR))
            factors.in_factor.copy_(files.factor(group_name, IN_FACTOR))
        for name, layer in self.lotr_layers():
            layer.lotr_core.copy_(files.core(name))
        own = self._saved_tensors(list(files.modules_to_save))
        for key, tensor in files.modules_to_save.items():
            if key not in own:
                raise ValueError(f"{source} saves {key!r} (modules_to_save), which the model lacks")
            if own[key].shape != tensor.shape:
                raise ValueError(
                    f"{source} saves {key!r} of shape {tuple(tensor.shape)}, but the model's is {tuple(own[key].shape)}"
                )
            own[key].copy_(tensor)


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
