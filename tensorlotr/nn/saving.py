"""Saving, loading and the Hub for :class:`tensorlotr.LoTRModel`: its adapters to and from ``LoTRAdapterFiles``.

Each function is the body of the ``LoTRModel`` method of the same name, which documents it
and shows it at work; classmethods take the class as ``cls``. The file formats are
:mod:`tensorlotr.io`'s: the model hands it an adapter's data, never its modules. A PEFT LoRA is
converted by :func:`tensorlotr.adapter.lora.lora_to_lotr`.
"""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapter import LoTRConfig
from ..adapter.layout import IN_FACTOR, OUT_FACTOR, LoTRAdapterFiles, ZooFiles, core_key, factor_key, saved_key
from ..adapter.lora import lora_to_lotr
from .layer import DEFAULT_ADAPTER, LoTRFactors, check_adapter_name

if TYPE_CHECKING:
    from .model import LoTRModel

__all__ = [
    "adapter_files",
    "from_adapter_files",
    "from_lora",
    "from_pretrained",
    "from_zoo",
    "load_adapter",
    "load_adapter_tensors",
    "push_to_hub",
    "read_lotr",
    "save_pretrained",
]


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor``: a DTensor (FSDP2) is all-gathered, a collective every process must join."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(tensor, DTensor):
            return tensor.full_tensor()
    return tensor


def _adapter_slots(lotr: LoTRModel, adapter: str) -> dict[str, tuple[nn.Module, str]]:
    """Every tensor of ``adapter`` by its key in :class:`LoTRAdapterFiles`, as (owning module, attribute)."""
    slots: dict[str, tuple[nn.Module, str]] = {}
    for group_name, group in lotr.adapter_groups[adapter].items():
        factors = lotr.lotr_factors[lotr._factor_keys[adapter][group_name]]
        slots[factor_key(group_name, OUT_FACTOR)] = (factors, "out_factor")
        slots[factor_key(group_name, IN_FACTOR)] = (factors, "in_factor")
        for name in group.modules:
            slots[core_key(name)] = (lotr._layer(name).lotr_cores, adapter)
    for key, slot in lotr._saved_slots(adapter).items():
        slots[saved_key(key)] = slot
    return slots


def adapter_files(lotr: LoTRModel, adapter: str | None = None) -> LoTRAdapterFiles:
    """Adapter ``adapter`` of ``lotr`` as saved; see :meth:`LoTRModel.adapter_files`.

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
    for key, (owner, attr) in _adapter_slots(lotr, adapter).items():
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
    ['README.md', 'lotr_config.json', 'lotr_model.safetensors']
    """
    if any(layer.merged for _, layer in lotr.lotr_layers()):
        raise RuntimeError("unmerge_adapter() before save_pretrained(): the cores are saved separately")
    names = list(lotr.lotr_configs) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in lotr.lotr_configs]
    if unknown:
        raise ValueError(f"selected_adapters {unknown} are not adapters of this model: {sorted(lotr.lotr_configs)}")
    files = {name: adapter_files(lotr, name) for name in names}
    if not is_main_process:
        return
    from ..io.lotr_format import write_adapter  # the file format lives in io; the model hands it data
    from ..io.model_card import write_model_card

    for name, adapter in files.items():
        folder = os.path.join(save_directory, "" if name == DEFAULT_ADAPTER else name)
        write_adapter(folder, adapter)
        write_model_card(folder, adapter, name)
    if push_to_hub:
        from ..files.hub import push_folder

        repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(save_directory))
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
) -> Any:
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
        save_pretrained(lotr, folder, selected_adapters=selected_adapters)
        return push_folder(folder, repo_id, token=token, private=private, commit_message=commit_message, **kwargs)


def read_lotr(folder: str | os.PathLike[str], given: str | os.PathLike[str]) -> LoTRAdapterFiles:
    """The LoTR adapter in ``folder`` (the user's ``given``); a PEFT LoRA folder is refused, saying how to convert it.

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
    from ..io import is_lotr_dir, read_adapter

    if not is_lotr_dir(folder) and os.path.isfile(os.path.join(folder, "adapter_config.json")):
        raise ValueError(
            f"{given} is a PEFT LoRA adapter, not a LoTR one: LoTRModel.from_lora(model, {str(given)!r}, rank=...) "
            f"converts it in memory, and `tensorlotr convert {given} OUT_DIR` writes a LoTR folder"
        )
    return read_adapter(folder)


def from_pretrained(
    cls: type[LoTRModel],
    model: nn.Module,
    adapter_dir: str | os.PathLike[str],
    adapter_name: str = DEFAULT_ADAPTER,
    is_trainable: bool = False,
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
    from ..files.hub import resolve_folder
    from ..io.zoo_format import is_zoo_dir, read_zoo

    folder = resolve_folder(adapter_dir, what="adapter", **hub_kwargs)
    if is_zoo_dir(folder):
        return from_zoo(cls, model, read_zoo(folder), is_trainable=is_trainable, source=f"zoo {adapter_dir}")
    files = read_lotr(folder, adapter_dir)
    return from_adapter_files(
        cls, model, files, is_trainable, source=f"adapter {adapter_dir}", adapter_name=adapter_name
    )


def from_adapter_files(
    cls: type[LoTRModel],
    model: nn.Module,
    files: LoTRAdapterFiles,
    is_trainable: bool = False,
    source: str = "the adapter",
    adapter_name: str = DEFAULT_ADAPTER,
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
    config = LoTRConfig.from_dict(files.config, strict=False)
    lotr = cls(model, config, layout=files.groups, source=source, adapter_name=adapter_name)
    load_adapter_tensors(lotr, files, source=source, adapter=adapter_name)
    lotr._set_trainable(adapter_name, is_trainable)
    if not is_trainable:
        lotr.eval()
    return lotr


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
        if lotr is None:
            lotr = cls(model, config, layout=files.groups, source=source, adapter_name=name, factor_owner="zoo")
        else:
            lotr._attach(name, config, files.groups, source=source, initialise=False, shared=shared, factor_owner="zoo")
        for group in files.groups:
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
    from ..files.hub import resolve_folder

    folder = resolve_folder(adapter_dir, what="adapter", **hub_kwargs)
    files = read_lotr(folder, adapter_dir)
    if adapter_name is None or adapter_name in lotr.lotr_configs:
        target = adapter_name or lotr.active_adapter
        mine = {k: v.to_dict() for k, v in lotr.adapter_groups[target].items()}
        if {k: v.to_dict() for k, v in files.groups.items()} != mine:
            raise ValueError(f"adapter {adapter_dir} has another layout than this model's adapter {target!r}")
        load_adapter_tensors(lotr, files, source=str(adapter_dir), adapter=target)
        return
    check_adapter_name(adapter_name)
    config = LoTRConfig.from_dict(files.config, strict=False)
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
    slots = _adapter_slots(lotr, adapter)
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
