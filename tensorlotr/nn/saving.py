"""Saving, loading and the Hub for :class:`tensorlotr.LoTRModel`: its adapters to and from ``LoTRAdapterFiles``.

Each function is the body of the ``LoTRModel`` method of the same name, which documents it
and shows it at work; classmethods take the class as ``cls``. The file formats are
:mod:`tensorlotr.io`'s: the model hands it an adapter's data, never its modules. Adapters are
saved in PEFT's format for the LoTR PEFT method (:mod:`tensorlotr.io.peft_lotr`), which
``peft.PeftModel.from_pretrained`` loads too; folders of the earlier format (``lotr_config.json``)
and folders ``PeftModel.save_pretrained`` wrote load here. A PEFT LoRA is converted by
:func:`tensorlotr.adapter.lora.lora_to_lotr`. PEFT's state-dict functions
(:func:`get_peft_model_state_dict`, :func:`set_peft_model_state_dict`) and hot-swapping
(:func:`hotswap_adapter`) live here too, under PEFT's names.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ..adapter import LoTRConfig
from ..adapter.config import ADAPTER_DTYPES
from ..adapter.groups import is_conv1d, matches
from ..adapter.layout import (
    IN_FACTOR,
    OUT_FACTOR,
    GroupLayout,
    LoTRAdapterFiles,
    ZooFiles,
    core_key,
    factor_key,
    saved_key,
)
from ..adapter.lora import lora_to_lotr
from ..io.peft_lotr import CONFIG_NAME as PEFT_CONFIG_NAME
from ..io.peft_lotr import (
    PeftLoTRFolder,
    is_peft_lotr_dir,
    peft_core_key,
    peft_factor_key,
    peft_saved_key,
    read_peft_lotr,
)
from .layer import DEFAULT_ADAPTER, LoTRFactors, check_adapter_name
from .targets import build_groups, unwrap, weight_of

if TYPE_CHECKING:
    from concurrent.futures import Future

    from huggingface_hub import CommitInfo

    from .model import LoTRModel

__all__ = [
    "adapter_files",
    "from_adapter_files",
    "from_lora",
    "from_pretrained",
    "from_zoo",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "load_adapter",
    "load_adapter_tensors",
    "push_to_hub",
    "read_lotr",
    "save_pretrained",
    "set_peft_model_state_dict",
]

#: What a plain ``transformers.Trainer`` writes for a model that is neither a ``PreTrainedModel`` nor a
#: ``PeftModel``: ``LoTRModel.state_dict()``, the adapters' tensors under the model's parameter names.
TRAINER_WEIGHTS_NAME = "model.safetensors"


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor``: a DTensor (FSDP2) is all-gathered, a collective every process must join."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return tensor.full_tensor()
    return tensor


#: How each kind of adapter tensor is keyed: ``(factor key(group, which), core key(module), saved key(name))``.
_KeyScheme = tuple[Callable[[str, str], str], Callable[[str], str], Callable[[str], str]]
#: The keys of :class:`LoTRAdapterFiles` and those of PEFT's state dict (``adapter_model.safetensors``).
_FILE_KEYS: _KeyScheme = (factor_key, core_key, saved_key)
_PEFT_KEYS: _KeyScheme = (peft_factor_key, peft_core_key, peft_saved_key)


def _slots(lotr: LoTRModel, adapter: str, keys: _KeyScheme) -> dict[str, tuple[nn.Module, str]]:
    """Every tensor of ``adapter`` by its key in ``keys``' scheme, as (owning module, attribute)."""
    factor, core, saved = keys
    slots: dict[str, tuple[nn.Module, str]] = {}
    for group_name, group in lotr.adapter_groups[adapter].items():
        factors = lotr.lotr_factors[lotr._factor_keys[adapter][group_name]]
        slots[factor(group_name, OUT_FACTOR)] = (factors, "out_factor")
        slots[factor(group_name, IN_FACTOR)] = (factors, "in_factor")
        for name in group.modules:
            slots[core(name)] = (lotr._layer(name).lotr_cores, adapter)
    for key, slot in lotr._saved_slots(adapter).items():
        slots[saved(key)] = slot
    return slots


def _model_keys(lotr: LoTRModel) -> dict[tuple[int, str], str]:
    """The key in ``lotr``'s own state dict of each (owning module, attribute) slot."""
    return {
        (id(module), name): f"{path}.{name}" if path else name
        for path, module in lotr.named_modules(remove_duplicate=False)
        for name in (*module._parameters, *module._buffers)
    }


def adapter_files(
    lotr: LoTRModel, adapter: str | None = None, state_dict: dict[str, torch.Tensor] | None = None
) -> LoTRAdapterFiles:
    """Adapter ``adapter`` of ``lotr`` as saved; see :meth:`LoTRModel.adapter_files`.

    With ``state_dict`` (a state dict of the whole ``LoTRModel``, under its own parameter
    names, as ``Trainer`` gathers one under DeepSpeed or FSDP) the tensors are taken from it.

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, LoTRModel, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
    >>> files = adapter_files(lotr)  # U (32, 4), V (32, 4) and two (4, 4) cores
    >>> sorted(files.groups), tuple(files.factor("query", "out_factor").shape)
    (['query'], (32, 4))
    """
    adapter = adapter or lotr.active_adapter
    if adapter not in lotr.lotr_configs:
        raise ValueError(f"no adapter {adapter!r}; adapters: {sorted(lotr.lotr_configs)}")
    tensors: dict[str, torch.Tensor] = {}
    names = _model_keys(lotr) if state_dict is not None else {}
    for key, (owner, attr) in _slots(lotr, adapter, _FILE_KEYS).items():
        if state_dict is not None:
            name = names.get((id(owner), attr))
            if name is None or name not in state_dict:
                raise ValueError(f"state_dict lacks the adapter's tensor {name or key!r}")
            tensors[key] = state_dict[name]
            continue
        tensor = _gathered(getattr(owner, attr))
        if tensor.is_meta:
            raise ValueError(
                f"adapter tensor {key!r} is on the meta device and holds no data; load the adapter "
                "(from_pretrained, load_adapter) or build it on a base model with weights before saving it"
            )
        tensors[key] = tensor
    base_config = getattr(lotr.base_model, "config", None)
    base = {
        "model_type": getattr(base_config, "model_type", None),
        "name_or_path": getattr(base_config, "_name_or_path", None),
        "class": type(lotr.base_model).__name__,
    }
    config = lotr.lotr_configs[adapter].to_dict()
    return LoTRAdapterFiles(config, dict(lotr.adapter_groups[adapter]), tensors, base)


def save_pretrained(
    lotr: LoTRModel,
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
    """Write ``lotr``'s adapters into ``save_directory``; see :meth:`LoTRModel.save_pretrained`.

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, LoTRModel, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
    >>> from pathlib import Path
    >>> save_pretrained(lotr, "my-adapter")
    >>> sorted(p.name for p in Path("my-adapter").iterdir())
    ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
    """
    del safe_serialization, save_embedding_layers  # PEFT's: LoTR writes safetensors, and embeddings only as copies
    if any(layer.merged for _, layer in lotr.lotr_layers()):
        raise RuntimeError("unmerge_adapter() before save_pretrained(): the cores are saved separately")
    names = list(lotr.lotr_configs) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in lotr.lotr_configs]
    if unknown:
        raise ValueError(f"selected_adapters {unknown} are not adapters of this model: {sorted(lotr.lotr_configs)}")
    files = {name: adapter_files(lotr, name, state_dict) for name in names}
    if not is_main_process:
        return
    repo_id = kwargs.pop("repo_id", None)  # where the adapter goes on the Hub: the model card names it
    if push_to_hub and not repo_id:
        repo_id = os.path.basename(os.path.normpath(save_directory))
    from ..io.model_card import write_model_card
    from ..io.peft_lotr import write_peft_lotr  # the file format lives in io; the model hands it data

    for name, adapter in files.items():
        folder = os.path.join(save_directory, "" if name == DEFAULT_ADAPTER else name)
        write_peft_lotr(folder, adapter, base_model_name_or_path=adapter.base_model.get("name_or_path") or None)
        write_model_card(folder, adapter, name, repo_id=repo_id)
    if push_to_hub:
        from ..files.hub import push_folder

        push_folder(save_directory, repo_id, **kwargs)


def push_to_hub(
    lotr: LoTRModel,
    repo_id: str,
    *,
    selected_adapters: list[str] | None = None,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str = "Upload LoTR adapter",
    **kwargs: Any,
) -> CommitInfo | Future[CommitInfo]:
    """Upload ``lotr``'s adapters to the Hub repo ``repo_id``; see :meth:`LoTRModel.push_to_hub`.

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, LoTRModel, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
    >>> push_to_hub(lotr, "user/my-adapter")  # offline here
    Traceback (most recent call last):
    ConnectionError: cannot push to 'user/my-adapter': HF_HUB_OFFLINE is set
    """
    from ..files.hub import push_folder

    with tempfile.TemporaryDirectory(prefix="tensorlotr-push-") as folder:
        save_pretrained(lotr, folder, selected_adapters=selected_adapters, repo_id=repo_id)
        return push_folder(folder, repo_id, token=token, private=private, commit_message=commit_message, **kwargs)


def _peft_layout(model: nn.Module, folder: PeftLoTRFolder, config: LoTRConfig, source: str) -> dict[str, GroupLayout]:
    """The groups of a folder ``PeftModel.save_pretrained`` wrote from a config, built on ``model`` as PEFT built them.

    The modules are those the file holds a core for, in the model's order; they stack into
    groups by ``config.groups`` and take its ranks and scales, as :class:`tensorlotr.peft.LoTRTuner` does.
    """
    cores = set(folder.core_modules())
    modules = dict(model.named_modules())
    missing = sorted(cores - set(modules))
    if missing:
        raise ValueError(f"{source} adapts module {missing[0]!r}, which the model lacks")
    names = [name for name in modules if name in cores]
    if not names:
        raise ValueError(f"{source} holds no cores ({folder.path})")
    return {
        g.name: GroupLayout(
            list(g.modules),
            g.shape,
            config.rank_of(g.name, g.modules),
            config.scale_of(g.name, g.modules),
            fan_in_fan_out=is_conv1d(unwrap(modules[g.modules[0]])),
        )
        for g in build_groups(model, names, config)
    }


def read_lotr(
    folder: str | os.PathLike[str],
    given: str | os.PathLike[str],
    model: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> LoTRAdapterFiles:
    """The LoTR adapter in ``folder`` (the user's ``given``), in either format, its tensors on ``device``.

    A folder ``PeftModel.save_pretrained`` wrote from a config (no ``lotr_layout``) gets its
    groups built on ``model``. A PEFT LoRA folder is refused, saying how to convert it, and so
    is a plain ``Trainer`` checkpoint of a ``LoTRModel``, saying how to load it.

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"])).save_pretrained("my-adapter")
    >>> read_lotr("my-adapter", "my-adapter").groups["query"].rank
    (4, 4)
    """
    from ..adapter.config import CONFIG_NAME
    from ..io import is_lotr_dir, read_adapter

    path = Path(folder)
    if is_peft_lotr_dir(path) and not (path / CONFIG_NAME).is_file():
        found = read_peft_lotr(path, device or "cpu")
        if found.peft.get("trainable_token_indices") is not None:
            raise ValueError(
                f"{given} trains PEFT's trainable_token_indices, which LoTRModel does not have; load it with "
                f"peft.PeftModel.from_pretrained(model, {str(given)!r}) after import tensorlotr"
            )
        groups = found.groups()
        if groups is None:
            if model is None:
                raise ValueError(f"{given} was saved by PEFT without a lotr_layout: its groups need the model")
            groups = _peft_layout(model, found, LoTRConfig.from_dict(found.config, strict=False), f"adapter {given}")
        return found.adapter_files(groups)
    if not is_lotr_dir(path) and (path / PEFT_CONFIG_NAME).is_file():
        raise ValueError(
            f"{given} is a PEFT LoRA adapter, not a LoTR one: LoTRModel.from_lora(model, {str(given)!r}, rank=...) "
            f"converts it in memory, and `tensorlotr convert {given} OUT_DIR` writes a LoTR folder"
        )
    if not is_lotr_dir(path) and (path / TRAINER_WEIGHTS_NAME).is_file():
        raise ValueError(
            f"{given} is a checkpoint of a plain transformers.Trainer: {TRAINER_WEIGHTS_NAME} holds the LoTRModel's "
            "state dict (its adapters' tensors under its parameter names) but not their config; load it into a "
            f"LoTRModel made with the same config, lotr.load_adapter({str(given)!r}), or train with "
            "tensorlotr.LoTRTrainer, whose checkpoints are adapter folders"
        )
    files = read_adapter(path)
    if device is not None:
        files.tensors = {k: v.to(device) for k, v in files.tensors.items()}
    return files


def from_pretrained(
    cls: type[LoTRModel],
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
    """Attach the adapter (or zoo) in ``adapter_dir`` to ``model``; see :meth:`LoTRModel.from_pretrained`.

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, LoTRModel, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
    >>> lotr.save_pretrained("my-adapter")
    >>> loaded = from_pretrained(LoTRModel, BertModel(bert), "my-adapter")
    >>> loaded.groups["query"].rank, loaded.get_nb_trainable_parameters()[0]  # frozen
    ((4, 4), 0)
    """
    del low_cpu_mem_usage  # PEFT's: a saved adapter is attached without initialising it, then filled
    from ..files.hub import resolve_folder
    from ..io.zoo_format import is_zoo_dir, read_zoo

    folder = resolve_folder(adapter_dir, what="adapter", **hub_kwargs)
    if is_zoo_dir(folder):
        return from_zoo(cls, model, read_zoo(folder), is_trainable=is_trainable, source=f"zoo {adapter_dir}")
    files = read_lotr(folder, adapter_dir, model, torch_device)
    return from_adapter_files(
        cls, model, files, is_trainable, source=f"adapter {adapter_dir}", adapter_name=adapter_name,
        autocast_adapter_dtype=autocast_adapter_dtype,
    )  # fmt: skip


def from_adapter_files(
    cls: type[LoTRModel],
    model: nn.Module,
    files: LoTRAdapterFiles,
    is_trainable: bool = False,
    source: str = "the adapter",
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    autocast_adapter_dtype: bool = True,
) -> LoTRModel:
    """Attach an adapter held in memory to ``model``; see :meth:`LoTRModel.from_adapter_files`.

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, LoTRModel, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
    >>> attached = from_adapter_files(LoTRModel, BertModel(bert), lotr.adapter_files(), is_trainable=True)
    >>> attached.active_adapter, attached.get_nb_trainable_parameters()[0]  # 4*32 + 4*32 + 2*4*4
    ('default', 288)
    """
    config = _loaded_config(model, files, is_trainable, autocast_adapter_dtype)
    lotr = cls(model, config, layout=files.groups, source=source, adapter_name=adapter_name)
    load_adapter_tensors(lotr, files, source=source, adapter=adapter_name)
    lotr._set_trainable(adapter_name, is_trainable)
    if not is_trainable:
        lotr.eval()
    return lotr


def _loaded_config(
    model: nn.Module, files: LoTRAdapterFiles, is_trainable: bool, autocast_adapter_dtype: bool = True
) -> LoTRConfig:
    """The config of a loaded adapter: ``inference_mode`` unless trainable, as PEFT sets it.

    Its ``modules_to_save`` keep the entries the file saves tensors for, once each: PEFT's
    SEQ_CLS default lists both ``classifier`` and ``score`` and wraps those that exist.

    ``autocast_adapter_dtype=False`` keeps a config without ``adapter_dtype`` in the dtype of
    the base weights (bfloat16 on a bfloat16 base), as PEFT's keyword does; by default the
    adapter is float32.
    """
    config = LoTRConfig.from_dict(files.config, strict=False)
    config.inference_mode = not is_trainable
    if config.modules_to_save:  # the modules the file saves: PEFT lists SEQ_CLS's "classifier" and "score" both
        owners = [key.rpartition(".")[0] for key in files.modules_to_save]
        config.modules_to_save = [
            p for p in dict.fromkeys(config.modules_to_save) if any(matches(o, [p]) for o in owners)
        ] or None
    if not autocast_adapter_dtype and config.adapter_dtype is None and files.groups:
        first = next(iter(files.groups.values())).modules[0]
        dtype = str(weight_of(unwrap(model.get_submodule(first))).dtype).removeprefix("torch.")
        if dtype in ADAPTER_DTYPES:
            config.adapter_dtype = dtype
    return config


def from_zoo(
    cls: type[LoTRModel], model: nn.Module, zoo: ZooFiles, is_trainable: bool = False, source: str = "the zoo"
) -> LoTRModel:
    """Attach every adapter of ``zoo``, factors held once; see :meth:`LoTRModel.from_zoo`.

    Examples
    --------
    Two adapters ``a`` and ``b`` of the two ``query`` layers (32, 32) of a BERT, sharing ``U``
    (32, 4) and ``V`` (32, 4):

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
    >>> lotr = from_zoo(LoTRModel, BertModel(bert), zoo)
    >>> sorted(lotr.lotr_configs), lotr.active_adapter, list(lotr.lotr_factors)  # the factors once
    (['a', 'b'], 'a', ['zoo--query'])
    """
    names = list(zoo.adapters)
    if not names:
        raise ValueError(f"{source} holds no adapters")
    lotr: LoTRModel | None = None
    shared: dict[str, LoTRFactors] = {}
    for name in names:
        files = zoo.adapter(name)
        config = LoTRConfig.from_dict(files.config, strict=False)
        # a group where the adapter has a residual gets its own factors, the shared ones with its columns
        # (keyed "<adapter>--residual--<group>": no adapter name makes that the zoo's "zoo--<group>")
        owner = {g: f"{name}--residual" if g in zoo.adapters[name].residual else "zoo" for g in files.groups}
        if lotr is None:
            lotr = cls(model, config, layout=files.groups, source=source, adapter_name=name, factor_owner=owner)
        else:
            mine = {g: f for g, f in shared.items() if owner.get(g, "zoo") == "zoo"}
            lotr._attach(name, config, files.groups, source=source, initialise=False, shared=mine, factor_owner=owner)
        for group in files.groups:
            if owner[group] == "zoo":
                shared.setdefault(group, lotr._factors(lotr._factor_keys[name][group]))
        load_adapter_tensors(lotr, files, source=f"{source}, adapter {name!r}", adapter=name)
        lotr._trainable[name] = is_trainable
    assert lotr is not None
    lotr.set_adapter(names[0])
    if not is_trainable:
        lotr.eval()
    return lotr


def from_lora(
    cls: type[LoTRModel],
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
    """Convert the PEFT LoRA in ``peft_dir`` in memory and attach it to ``model``; see :meth:`LoTRModel.from_lora`.

    Examples
    --------
    A PEFT LoRA of rank 2 on the two ``query`` layers of a BERT, converted at its exact rank, 4:

    >>> import peft
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRModel
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lora = peft.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False)
    >>> peft.get_peft_model(BertModel(bert), lora).save_pretrained("my-bert-lora")
    >>> lotr = from_lora(LoTRModel, BertModel(bert), "my-bert-lora")
    >>> lotr.groups["query"].rank, lotr.conversion_report.relative_error < 1e-6
    ((4, 4), True)
    """
    from ..files.hub import resolve_folder
    from ..io import is_lotr_dir
    from ..io.peft_lora import PeftLoRA
    from ..io.zoo_format import is_zoo_dir

    folder = resolve_folder(peft_dir, what="PEFT LoRA", **hub_kwargs)
    if is_lotr_dir(folder) or is_zoo_dir(folder):
        raise ValueError(
            f"{peft_dir} is a LoTR adapter, not a PEFT LoRA: LoTRModel.from_pretrained(model, {str(peft_dir)!r}) "
            "attaches it"
        )
    conversion = lora_to_lotr(PeftLoRA(folder), rank=rank, energy=energy, n_iter=n_iter)
    lotr = from_adapter_files(cls, model, conversion.files, is_trainable, f"LoRA {peft_dir}", adapter_name)
    lotr.conversion_report = conversion
    return lotr


def load_adapter(
    lotr: LoTRModel,
    adapter_dir: str | os.PathLike[str],
    adapter_name: str | None = None,
    is_trainable: bool = False,
    *,
    torch_device: str | torch.device | None = None,
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
    **hub_kwargs: Any,
) -> None:
    """Load a saved adapter into ``lotr``, new or into an existing one; see :meth:`LoTRModel.load_adapter`.

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, LoTRModel, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
    >>> lotr.save_pretrained("my-adapter")
    >>> load_adapter(lotr, "my-adapter", adapter_name="saved")  # a second adapter, inactive
    >>> sorted(lotr.lotr_configs), lotr.active_adapters
    (['default', 'saved'], ['default'])
    """
    del low_cpu_mem_usage  # PEFT's: a saved adapter is attached without initialising it, then filled
    from ..files.hub import resolve_folder
    from ..io import is_lotr_dir

    folder = resolve_folder(adapter_dir, what="adapter", **hub_kwargs)
    into = adapter_name is None or adapter_name in lotr.lotr_configs
    trainer_checkpoint = not is_lotr_dir(folder) and (folder / TRAINER_WEIGHTS_NAME).is_file()
    if into and trainer_checkpoint and not (folder / PEFT_CONFIG_NAME).is_file():
        from safetensors.torch import load_file

        lotr.load_state_dict(load_file(str(folder / TRAINER_WEIGHTS_NAME), device=str(torch_device or "cpu")))
        return
    files = read_lotr(folder, adapter_dir, lotr.base_model, torch_device)
    if into:
        target = adapter_name or lotr.active_adapter
        mine = {k: v.to_dict() for k, v in lotr.adapter_groups[target].items()}
        if {k: v.to_dict() for k, v in files.groups.items()} != mine:
            raise ValueError(f"adapter {adapter_dir} has another layout than this model's adapter {target!r}")
        load_adapter_tensors(lotr, files, source=str(adapter_dir), adapter=target)
        return
    assert adapter_name is not None
    check_adapter_name(adapter_name)
    config = _loaded_config(lotr.base_model, files, is_trainable, autocast_adapter_dtype)
    lotr._attach(adapter_name, config, files.groups, source=f"adapter {adapter_dir}", initialise=False)
    load_adapter_tensors(lotr, files, source=str(adapter_dir), adapter=adapter_name)
    lotr._set_trainable(adapter_name, is_trainable)


@torch.no_grad()
def load_adapter_tensors(
    lotr: LoTRModel, files: LoTRAdapterFiles, source: str = "adapter", adapter: str | None = None
) -> None:
    """Copy the tensors of ``files`` into ``lotr``'s adapter ``adapter``; see :meth:`LoTRModel.load_adapter_tensors`.

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, LoTRModel, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
    >>> import torch
    >>> other = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
    >>> load_adapter_tensors(other, lotr.adapter_files())
    >>> torch.equal(other.lotr_factors["query"].out_factor, lotr.lotr_factors["query"].out_factor)
    True
    """
    adapter = adapter or lotr.active_adapter
    slots = _slots(lotr, adapter, _FILE_KEYS)
    optional = {saved_key(k) for k in lotr._saved_slots(adapter)}  # a saved module's tensor the file leaves out
    for key in files.modules_to_save:
        if saved_key(key) not in slots:
            raise ValueError(
                f"{source} saves {key!r} (modules_to_save), which the model lacks or which is in none of "
                f"its modules_to_save {sorted(lotr._saved_names(adapter))}"
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


# --- PEFT's state-dict functions and hot-swapping --------------------------------------------------


def get_peft_model_state_dict(
    model: LoTRModel, state_dict: dict[str, torch.Tensor] | None = None, adapter_name: str = DEFAULT_ADAPTER
) -> dict[str, torch.Tensor]:
    """Adapter ``adapter_name``'s tensors keyed as in ``adapter_model.safetensors``, as PEFT's function of that name.

    The keys are those of the LoTR PEFT method (``base_model.lotr_factors.<group>.out_factor``,
    ``base_model.model.<module>.lotr_cores``, ``base_model.model.<parameter>`` for
    ``modules_to_save``), without the adapter's name, so the result of a ``LoTRModel`` and of
    the ``PeftModel`` that holds the same adapter are equal. ``state_dict`` (the ``LoTRModel``'s
    whole state dict under its own parameter names) is read instead of the model's tensors.
    The tensors are detached, not copied.

    Examples
    --------
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
    >>> state = get_peft_model_state_dict(lotr)  # U (32, 4), V (32, 4) and two (4, 4) cores
    >>> {key: tuple(tensor.shape) for key, tensor in state.items()}
    {'base_model.lotr_factors.query.out_factor': (32, 4), 'base_model.lotr_factors.query.in_factor': (32, 4),
     'base_model.model.encoder.layer.0.attention.self.query.lotr_cores': (4, 4),
     'base_model.model.encoder.layer.1.attention.self.query.lotr_cores': (4, 4)}
    """
    if adapter_name not in model.lotr_configs:
        raise ValueError(f"no adapter {adapter_name!r}; adapters: {sorted(model.lotr_configs)}")
    names = _model_keys(model) if state_dict is not None else {}
    out: dict[str, torch.Tensor] = {}
    for key, (owner, attr) in _slots(model, adapter_name, _PEFT_KEYS).items():
        if state_dict is None:
            out[key] = _gathered(getattr(owner, attr)).detach()
            continue
        name = names.get((id(owner), attr))
        if name is None or name not in state_dict:
            raise ValueError(f"state_dict lacks the adapter's tensor {name or key!r}")
        out[key] = state_dict[name]
    return out


@torch.no_grad()
def set_peft_model_state_dict(
    model: LoTRModel, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = DEFAULT_ADAPTER
) -> _IncompatibleKeys:
    """Copy a state dict keyed as :func:`get_peft_model_state_dict`'s into adapter ``adapter_name``, as PEFT's function.

    Returns ``(missing_keys, unexpected_keys)`` as ``torch``'s ``load_state_dict`` does: the
    adapter's keys the dict lacks (those tensors are left as they are) and the dict's keys that
    are no tensor of the adapter. A tensor of the wrong shape raises ``ValueError``, before
    anything is copied. Tensors are copied in place (their identity, device and dtype stay).

    Examples
    --------
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> config = LoTRConfig(rank=4, target_modules=["query"])
    >>> lotr, other = get_lotr_model(BertModel(bert), config), get_lotr_model(BertModel(bert), config)
    >>> set_peft_model_state_dict(other, get_peft_model_state_dict(lotr))
    <All keys matched successfully>
    >>> torch.equal(other.lotr_factors["query"].out_factor, lotr.lotr_factors["query"].out_factor)
    True
    """
    if adapter_name not in model.lotr_configs:
        raise ValueError(f"no adapter {adapter_name!r}; adapters: {sorted(model.lotr_configs)}")
    slots = _slots(model, adapter_name, _PEFT_KEYS)
    loads = []
    for key, value in peft_model_state_dict.items():
        if key not in slots:
            continue
        owner, attr = slots[key]
        current = getattr(owner, attr)
        if tuple(current.shape) != tuple(value.shape):
            raise ValueError(f"{key!r} has shape {tuple(value.shape)}, but the model's is {tuple(current.shape)}")
        loads.append((current, value))
    for current, value in loads:
        current.copy_(value)
    missing = [k for k in slots if k not in peft_model_state_dict]
    unexpected = [k for k in peft_model_state_dict if k not in slots]
    return _IncompatibleKeys(missing, unexpected)


@torch.no_grad()
def hotswap_adapter(
    model: LoTRModel,
    model_name_or_path: str | os.PathLike[str],
    adapter_name: str = DEFAULT_ADAPTER,
    torch_device: str | torch.device | None = None,
    **hub_kwargs: Any,
) -> None:
    """Replace the tensors of adapter ``adapter_name`` in place by the saved adapter's, as PEFT's ``hotswap_adapter``.

    The tensors keep their identity, device, dtype and shape and the layers their scales, so a
    compiled model runs the new adapter without recompiling. The saved adapter must have the
    same groups of the same modules (and the same ``modules_to_save``) at ranks no larger: a
    smaller rank is padded with zero columns of ``U`` and ``V`` and zero rows and columns of
    the cores, which is exact; a different scale is folded into the cores,
    ``G <- (s_new / s) G_new``. Adapters whose factors other adapters share (a zoo) are refused.

    Examples
    --------
    Two rank-4 adapters of one BERT; the second is swapped into the first:

    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
    >>> other = get_lotr_model(BertModel(bert), LoTRConfig(rank=2, alpha=4, target_modules=["query"]))
    >>> other.save_pretrained("other-adapter")
    >>> factor = lotr.lotr_factors["query"].out_factor  # U (32, 4)
    >>> hotswap_adapter(lotr, "other-adapter")  # rank 2 into rank 4, padded with zeros
    >>> new = other.lotr_factors["query"].out_factor  # U (32, 2)
    >>> lotr.lotr_factors["query"].out_factor is factor, torch.equal(factor[:, :2], new)
    (True, True)
    """
    from ..files.hub import resolve_folder

    if adapter_name not in model.lotr_configs:
        raise ValueError(f"no adapter {adapter_name!r}; adapters: {sorted(model.lotr_configs)}")
    if any(layer.merged for _, layer in model.lotr_layers()):
        raise RuntimeError("unmerge_adapter() before hotswap_adapter(): merged weights cannot be swapped")
    folder = resolve_folder(model_name_or_path, what="adapter", **hub_kwargs)
    files = read_lotr(folder, model_name_or_path, model.base_model, torch_device)
    mine = model.adapter_groups[adapter_name]
    theirs = files.groups
    if {g: layout.modules for g, layout in theirs.items()} != {g: layout.modules for g, layout in mine.items()}:
        raise ValueError(
            f"hot-swapping replaces adapter {adapter_name!r}'s tensors in place, so {model_name_or_path} must adapt "
            f"the same groups of the same modules: it has {sorted(theirs)}, the model's adapter {sorted(mine)}"
        )
    for group, layout in theirs.items():
        have = mine[group].rank
        if layout.rank[0] > have[0] or layout.rank[1] > have[1]:
            raise ValueError(
                f"{model_name_or_path} has rank {tuple(layout.rank)} in group {group!r}, above the model's "
                f"{tuple(have)}: hot-swapping pads a smaller rank with zeros and cannot grow tensors in place; load it "
                "with load_adapter(path, adapter_name=...) instead"
            )
    shared = {k for a, keys in model._factor_keys.items() if a != adapter_name for k in keys.values()}
    if shared & set(model._factor_keys[adapter_name].values()):
        raise ValueError(
            f"adapter {adapter_name!r} shares its factors with other adapters (a zoo): swapping them would change "
            "those adapters too"
        )
    saved = model._saved_slots(adapter_name)
    if set(saved) != set(files.modules_to_save):
        raise ValueError(
            f"hot-swapping needs the same modules_to_save tensors: {model_name_or_path} saves "
            f"{sorted(files.modules_to_save)}, the model's adapter {sorted(saved)}"
        )
    for key, (owner, attr) in saved.items():
        if tuple(getattr(owner, attr).shape) != tuple(files.modules_to_save[key].shape):
            raise ValueError(f"{model_name_or_path}: {key!r} has another shape than the model's")
    for group, layout in theirs.items():
        factors = model._factors(model._factor_keys[adapter_name][group])
        r_out, r_in = layout.rank
        for which, width in ((OUT_FACTOR, r_out), (IN_FACTOR, r_in)):
            target = getattr(factors, which)
            target.zero_()
            target[:, :width] = files.tensors[factor_key(group, which)].to(target)
        ratio = layout.scale / mine[group].scale
        for name in layout.modules:
            core = model._layer(name).lotr_cores[adapter_name]
            core.zero_()
            core[:r_out, :r_in] = (ratio * files.tensors[core_key(name)].to(torch.float64)).to(core)
    for key, (owner, attr) in saved.items():
        getattr(owner, attr).copy_(files.modules_to_save[key])
