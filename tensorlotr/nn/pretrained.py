"""``LoTRModel``'s save, load and Hub methods: PEFT's ``save_pretrained``, ``from_pretrained``, ``load_adapter``, ….

:class:`PretrainedMixin` holds the methods, documented, as transformers' ``PushToHubMixin``
does for its models: the torch state dict of the adapters' tensors (what ``transformers.Trainer``
checkpoints), and thin methods whose bodies are the functions of :mod:`tensorlotr.nn.saving`
(and :func:`tensorlotr.nn.from_peft.lotr_from_peft_model`), so that :mod:`tensorlotr.nn.model`
keeps attaching, switching, running and merging adapters only.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

from ..adapter.layout import LoTRAdapterFiles, ZooFiles
from . import saving
from .from_peft import lotr_from_peft_model
from .layer import DEFAULT_ADAPTER

if TYPE_CHECKING:
    from concurrent.futures import Future

    from huggingface_hub import CommitInfo

    from ..adapter import LoTRConfig
    from .model import LoTRModel


def _lotr(model: PretrainedMixin) -> LoTRModel:
    """``model`` as the :class:`LoTRModel` it is: the mixin is a base of that class only."""
    return cast("LoTRModel", model)


def _lotr_class(cls: type[PretrainedMixin]) -> type[LoTRModel]:
    """``cls`` as the :class:`LoTRModel` class (or subclass) it is."""
    return cast("type[LoTRModel]", cls)


class PretrainedMixin:
    """The save, load and Hub methods of :class:`tensorlotr.LoTRModel`, which is the one class to mix it in.

    Examples
    --------
    Save the adapter of a 2-layer BERT of hidden size 32, then attach it to a fresh base:

    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, LoTRModel, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
    >>> isinstance(lotr, PretrainedMixin), LoTRModel.save_pretrained is PretrainedMixin.save_pretrained
    (True, True)
    >>> lotr.save_pretrained("my-adapter")
    >>> LoTRModel.from_pretrained(BertModel(bert), "my-adapter").groups["query"].rank
    (4, 4)
    """

    # --- the state dict: the adapters', as PEFT saves them, for Trainer's checkpoints ---------------
    def _adapter_tensor_ids(self) -> set[int]:
        """The ids of every adapter tensor: factors, cores, and the copies of ``modules_to_save``."""
        lotr = _lotr(self)
        ids = {id(t) for t in (*lotr.lotr_factors.parameters(), *lotr.lotr_factors.buffers())}
        for _, layer in lotr.lotr_layers():
            ids.update(id(core) for core in layer.lotr_cores.values())
        for adapter in lotr.lotr_configs:
            ids.update(id(getattr(owner, attr)) for owner, attr in lotr._saved_slots(adapter).values())
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
            return nn.Module.state_dict(_lotr(self), *args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        full = nn.Module.state_dict(_lotr(self), prefix=prefix, keep_vars=True)
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
        result = nn.Module.load_state_dict(_lotr(self), state_dict, strict=False, assign=assign)
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

    # --- PEFT's files and the Hub (tensorlotr.nn.saving) ---------------------------------------
    def adapter_files(self, adapter: str | None = None) -> LoTRAdapterFiles:
        """Adapter ``adapter``'s (default: the active one's) config, layout and tensors, as saved.

        Tensors sharded by FSDP2 (DTensors) are all-gathered, so every process must call this.
        Raises ``ValueError`` for a tensor on the meta device, which holds no data.
        """

        return saving.adapter_files(_lotr(self), adapter)

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
            _lotr(self), save_directory, is_main_process, selected_adapters, push_to_hub, state_dict=state_dict,
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
            _lotr(self), repo_id, selected_adapters=selected_adapters, token=token, private=private,
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
            _lotr_class(cls), model, adapter_dir, adapter_name, is_trainable,
            autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage,
            torch_device=torch_device, **hub_kwargs,
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

        return saving.from_adapter_files(_lotr_class(cls), model, files, is_trainable, source, adapter_name)

    @classmethod
    def from_zoo(
        cls, model: nn.Module, zoo: ZooFiles, is_trainable: bool = False, source: str = "the zoo"
    ) -> LoTRModel:
        """Attach every adapter of a zoo (:class:`tensorlotr.adapter.layout.ZooFiles`), factors held once."""

        return saving.from_zoo(_lotr_class(cls), model, zoo, is_trainable, source)

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
            _lotr_class(cls), model, peft_dir, rank=rank, energy=energy, n_iter=n_iter, adapter_name=adapter_name,
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

        return lotr_from_peft_model(_lotr_class(cls), peft_model, config, rank=rank, is_trainable=is_trainable)

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
            _lotr(self), adapter_dir, adapter_name, is_trainable, torch_device=torch_device,
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
        return saving.get_peft_model_state_dict(_lotr(self), adapter_name=adapter_name or _lotr(self).active_adapter)

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
        return saving.set_peft_model_state_dict(
            _lotr(self), state_dict, adapter_name=adapter_name or _lotr(self).active_adapter
        )

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
        saving.hotswap_adapter(_lotr(self), model_name_or_path, adapter_name, torch_device, **hub_kwargs)

    def load_adapter_tensors(
        self, files: LoTRAdapterFiles, source: str = "adapter", adapter: str | None = None
    ) -> None:
        """Copy the tensors of ``files`` into adapter ``adapter`` (default: the active one).

        An adapter tensor on the meta device (the base was built under ``init_empty_weights``,
        say) is replaced by the file's, on the CPU in the adapter tensor's dtype. Raises
        ``ValueError`` for a tensor of the wrong shape, a ``modules_to_save`` tensor the model
        lacks, and an adapter tensor the file does not hold that would stay on the meta device.
        """

        saving.load_adapter_tensors(_lotr(self), files, source, adapter)
