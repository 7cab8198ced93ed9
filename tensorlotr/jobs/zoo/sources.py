"""The zoo's adapter readers: a PEFT LoRA folder, a LoTR folder or a zoo member, each seen as LoRA factors.

Every source gives the same view (:class:`Source`): its modules with their shapes, its
separate size, and per module ``B_l`` (d_out, r_l), ``A_l`` (r_l, d_in) and the scale ``s_l``
of ``dW_l = s_l B_l A_l``. A LoTR adapter (a folder, or one adapter of a zoo for a refit) is
read through :meth:`tensorlotr.adapter.LoTRAdapterFiles.lora_factors`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import torch

from ...adapter import LoTRAdapterFiles
from ...adapter.layout import ZooFiles
from ...io import is_lotr_dir, read_adapter
from ...io.peft_lora import CONFIG_NAME as PEFT_CONFIG_NAME
from ...io.peft_lora import PeftLoRA
from ...io.zoo_format import ADAPTER_NAME, RESERVED_NAMES, is_zoo_dir

#: LoRA layers: ``B_l`` (d_out, r_l), ``A_l`` (r_l, d_in) and the scales ``s_l``, in module order.
Layers = tuple[list[torch.Tensor], list[torch.Tensor], list[float]]


class Source(Protocol):
    """One adapter to put in a zoo, as LoRA factors.

    ``modules`` maps module path to ``(d_out, d_in)``; ``n_params`` is its separate size and
    ``base`` the base model it names (None when it names none).
    """

    path: str
    modules: dict[str, tuple[int, int]]
    n_params: int
    fan_in_fan_out: bool
    base: str | None

    def load(self, names: list[str], stored: bool = False) -> Layers:
        """The layers of ``names``; with ``stored``, in the dtype they are stored in (half precision kept)."""
        ...

    def load_modules_to_save(self) -> dict[str, torch.Tensor]:
        """Its ``modules_to_save`` tensors by parameter path."""
        ...


class LoRASource:
    """A PEFT LoRA folder; its layers in float32 (float64 when stored so), as ``convert_lora`` reads them.

    Examples
    --------
    ``my-lora/`` holds a rank-4 LoRA on ``q_proj`` and ``v_proj`` of a 2-layer model of hidden size 32:

    >>> source = LoRASource(PeftLoRA("my-lora"))
    >>> len(source.modules), source.n_params
    (4, 1024)
    >>> bs, as_, scales = source.load(sorted(source.modules)[:1])
    >>> tuple(bs[0].shape), tuple(as_[0].shape), bs[0].dtype
    ((32, 4), (4, 32), torch.float32)
    """

    def __init__(self, lora: PeftLoRA, path: str | None = None) -> None:
        self.lora = lora
        self.path = path if path is not None else str(lora.path)
        self.modules = {m.name: m.shape for m in lora.modules.values()}
        self.n_params = lora.n_params
        self.fan_in_fan_out = lora.fan_in_fan_out
        self.base: str | None = lora.config.get("base_model_name_or_path")

    def load(self, names: list[str], stored: bool = False) -> Layers:
        """``B_l``, ``A_l`` and ``s_l`` of ``names``, in float32 unless stored in float64 (errors add up in float64).

        ``stored=True`` keeps the stored dtype (bfloat16 stays bfloat16: half the memory for a
        fit that converts one batch of layers at a time).
        """
        bs, as_, scales = self.lora.load(names)
        if stored:
            return bs, as_, scales
        work = torch.float64 if bs[0].dtype == torch.float64 else torch.float32
        return [b.to(work) for b in bs], [a.to(work) for a in as_], scales

    def load_modules_to_save(self) -> dict[str, torch.Tensor]:
        """The LoRA's ``modules_to_save`` tensors by parameter path."""
        return self.lora.load_modules_to_save()


class LoTRSource:
    """A LoTR adapter (a folder, or an adapter of a zoo) as LoRA factors at scale 1, in float64.

    Examples
    --------
    >>> import numpy as np
    >>> from tensorlotr.adapter import AdapterBuilder
    >>> from tensorlotr.core import tucker2
    >>> builder = AdapterBuilder()
    >>> tucker = tucker2(np.random.default_rng(0).standard_normal((2, 6, 5)), rank=(3, 2))
    >>> builder.add_group("query", ["layer.0.query", "layer.1.query"], tucker, fan_in_fan_out=False)
    >>> source = LoTRSource(builder.build(["query"], "by_name", [], {}), "my-lotr", n_params=70)
    >>> source.modules
    {'layer.0.query': (6, 5), 'layer.1.query': (6, 5)}
    >>> bs, as_, scales = source.load(["layer.1.query"])  # rank min(r_out, r_in) = 2
    >>> tuple(bs[0].shape), tuple(as_[0].shape), scales
    ((6, 2), (2, 5), [1.0])
    """

    def __init__(self, files: LoTRAdapterFiles, path: str, n_params: int, base: str | None = None) -> None:
        self.files = files
        self.path = path
        self.modules = {m: g.shape for g in files.groups.values() for m in g.modules}
        self.n_params = n_params
        self.fan_in_fan_out = any(g.fan_in_fan_out for g in files.groups.values())
        self.base = base

    def load(self, names: list[str], stored: bool = False) -> Layers:
        """``B_l`` and ``A_l`` of ``names`` from their groups' :meth:`LoTRAdapterFiles.lora_factors`, in float64."""
        group_of = {m: g for g, layout in self.files.groups.items() for m in layout.modules}
        views = {g: self.files.lora_factors(g, torch.float64) for g in {group_of[m] for m in names}}
        pairs = [views[group_of[m]][m] for m in names]
        return [b for b, _ in pairs], [a for _, a in pairs], [1.0] * len(names)

    def load_modules_to_save(self) -> dict[str, torch.Tensor]:
        """The adapter's ``modules_to_save`` tensors by parameter path."""
        return self.files.modules_to_save


def read_source(path: str | os.PathLike[str]) -> LoRASource | LoTRSource:
    """The adapter in folder ``path``: a PEFT LoRA or a LoTR adapter (a zoo is refused).

    Examples
    --------
    >>> source = read_source("my-lora")
    >>> type(source).__name__, source.path
    ('LoRASource', 'my-lora')
    """
    folder = Path(path)
    if is_zoo_dir(folder):
        raise ValueError(f"{folder} is a zoo, not an adapter; export one of its adapters first (--adapter)")
    if (folder / PEFT_CONFIG_NAME).is_file() and not is_lotr_dir(folder):  # a LoTR one is PEFT's format too
        return LoRASource(PeftLoRA(folder), str(path))
    if is_lotr_dir(folder):
        files = read_adapter(folder)
        n_params = sum(g.n_params for g in files.groups.values())
        return LoTRSource(files, str(path), n_params, files.base_model.get("name_or_path"))
    raise FileNotFoundError(f"{folder} holds neither a PEFT LoRA ({PEFT_CONFIG_NAME}) nor a LoTR adapter")


def zoo_member(zoo: ZooFiles, name: str) -> LoTRSource:
    """Adapter ``name`` of ``zoo`` as a source (for a refit): the zoo's factors and its cores.

    Examples
    --------
    >>> import torch
    >>> from tensorlotr.adapter.layout import GroupLayout, ZooAdapter, factor_key, zoo_core_key
    >>> layout = GroupLayout(["layer.0.query"], shape=(6, 5), rank=(3, 2), scale=1.0)
    >>> u, v, core = torch.randn(6, 3), torch.randn(5, 2), torch.randn(3, 2)  # U, V and one core
    >>> tensors = {factor_key("query", "out_factor"): u, factor_key("query", "in_factor"): v}
    >>> tensors[zoo_core_key("a", "layer.0.query")] = core
    >>> zoo = ZooFiles({"query": layout}, {"a": ZooAdapter("lora-a", {"query": layout.modules}, 60)}, tensors)
    >>> member = zoo_member(zoo, "a")
    >>> member.path, member.n_params, member.modules
    ('lora-a', 60, {'layer.0.query': (6, 5)})
    """
    entry = zoo.adapters[name]
    return LoTRSource(zoo.adapter(name), entry.source, entry.lora_params, zoo.base_model.get("name_or_path"))


def adapter_names(paths: list[str], names: list[str] | None) -> list[str]:
    """``names``, or the folder names of ``paths``: checked to be one per path, unique, letters, digits, '_' or '-'.

    Examples
    --------
    >>> adapter_names(["loras/sst2", "loras/mnli"], None)
    ['sst2', 'mnli']
    >>> adapter_names(["a/lora", "b/lora"], None)
    Traceback (most recent call last):
    ...
    ValueError: adapter names must be unique; repeated: ['lora'] (give --names)
    """
    chosen = list(names) if names is not None else [Path(p).resolve().name for p in paths]
    if len(chosen) != len(paths):
        raise ValueError(f"{len(chosen)} names for {len(paths)} sources")
    for name in chosen:
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or name in RESERVED_NAMES:
            raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-', and not '__base__'")
    duplicates = sorted({n for n in chosen if chosen.count(n) > 1})
    if duplicates:
        raise ValueError(f"adapter names must be unique; repeated: {duplicates} (give --names)")
    return chosen


def check_same_base(sources: dict[str, Source]) -> dict[str, tuple[int, int]]:
    """Every module's shape across the sources; errors on other bases or mismatched shapes.

    Examples
    --------
    >>> shapes = check_same_base({"a": read_source("my-lora"), "b": read_source("my-lora")})
    >>> len(shapes), shapes[sorted(shapes)[0]]
    (4, (32, 32))
    """
    bases = {name: s.base for name, s in sources.items() if s.base}
    if len(set(bases.values())) > 1:
        listing = ", ".join(f"{n}: {b}" for n, b in bases.items())
        raise ValueError(f"the sources are adapters of different base models ({listing})")
    roots = {name: {m.split(".", 1)[0] for m in s.modules} for name, s in sources.items()}
    first = next(iter(roots))
    for name, root in roots.items():
        if not root & roots[first]:
            raise ValueError(
                f"adapters {first!r} and {name!r} share no module path root ({sorted(roots[first])} vs {sorted(root)}):"
                " they are adapters of different base models"
            )
    shapes: dict[str, tuple[int, int]] = {}
    owner: dict[str, str] = {}
    for name, source in sources.items():
        for module, shape in source.modules.items():
            if module in shapes and shapes[module] != shape:
                raise ValueError(
                    f"module {module!r} is {shapes[module][0]}x{shapes[module][1]} in {owner[module]!r} but "
                    f"{shape[0]}x{shape[1]} in {name!r}: these adapters are not for the same base"
                )
            shapes.setdefault(module, shape)
            owner.setdefault(module, name)
    return shapes
