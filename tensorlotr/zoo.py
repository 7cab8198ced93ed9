"""The LoRA zoo: many adapters of one base compressed into one shared Tucker-2 basis per group.

Across a zoo, a group's updates form a 4-way tensor (adapter, layer, d_out, d_in). Each group
gets one ``U`` (d_out, r_out) and one ``V`` (d_in, r_in) shared by every adapter and layer, and
each adapter owns an ``r_out x r_in`` core per layer. The adapter and layer modes are never
compressed, so the decomposition is :func:`tensorlotr.tucker2_lowrank` of the list of every
adapter's LoRA factors: factored throughout, exact at full rank, with optional HOOI sweeps.
A group that an adapter lacks has no cores for it and costs nothing.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapter import group_modules, module_order
from .adapter.layout import (
    IN_FACTOR,
    OUT_FACTOR,
    GroupLayout,
    ZooAdapter,
    ZooFiles,
    factor_key,
    zoo_core_key,
    zoo_saved_key,
)
from .core import Tucker2, lowrank_norm_sq, normalize_rank, relative_error_lowrank, tucker2_lowrank
from .io import is_lotr_dir, read_adapter
from .io.atomic import atomic_dir, check_output
from .io.peft_lora import CONFIG_NAME as PEFT_CONFIG_NAME
from .io.peft_lora import PeftLoRA
from .io.zoo_format import is_zoo_dir, read_zoo, write_zoo
from .progress import Progress, no_progress
from .report import Result, format_table

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class _Source:
    """One adapter to put in a zoo, as LoRA factors: a PEFT LoRA folder or a LoTR adapter folder.

    ``modules`` maps module path to ``(d_out, d_in)``; :meth:`load` gives ``B_l`` (d_out, r_l),
    ``A_l`` (r_l, d_in) and ``s_l`` for a list of modules.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        folder = Path(path)
        if is_zoo_dir(folder):
            raise ValueError(f"{folder} is a zoo, not an adapter; export one of its adapters first (--adapter)")
        if (folder / PEFT_CONFIG_NAME).is_file():
            self.lora: PeftLoRA | None = PeftLoRA(folder)
            self.modules = {m.name: m.shape for m in self.lora.modules.values()}
            self.n_params = self.lora.n_params
            self.fan_in_fan_out = self.lora.fan_in_fan_out
            self.base = self.lora.config.get("base_model_name_or_path")
            self._lotr = None
        elif is_lotr_dir(folder):
            self.lora = None
            self._lotr = read_adapter(folder)
            self.modules = {m: tuple(g.shape) for g in self._lotr.groups.values() for m in g.modules}
            self.n_params = sum(g.n_params for g in self._lotr.groups.values())
            self.fan_in_fan_out = any(g.fan_in_fan_out for g in self._lotr.groups.values())
            self.base = self._lotr.base_model.get("name_or_path")
        else:
            raise FileNotFoundError(f"{folder} holds neither a PEFT LoRA ({PEFT_CONFIG_NAME}) nor a LoTR adapter")

    def load(self, names: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
        if self.lora is not None:
            bs, as_, scales = self.lora.load(names)
            return [b.double() for b in bs], [a.double() for a in as_], scales
        assert self._lotr is not None
        group_of = {m: (name, g) for name, g in self._lotr.groups.items() for m in g.modules}
        bs, as_ = [], []
        for module in names:  # dW = U (s G) V^T: B = U (d_out, r_out), A = s G V^T (r_out, d_in)
            group, layout = group_of[module]
            u = self._lotr.factor(group, OUT_FACTOR).double()
            v = self._lotr.factor(group, IN_FACTOR).double()
            bs.append(u)
            as_.append(layout.scale * self._lotr.core(module).double() @ v.T)
        return bs, as_, [1.0] * len(names)

    def load_modules_to_save(self) -> dict[str, torch.Tensor]:
        if self.lora is not None:
            return self.lora.load_modules_to_save()
        assert self._lotr is not None
        return self._lotr.modules_to_save


@dataclass
class ZooAdapterReport:
    """One adapter of a zoo: its modules, its separate size, what it adds to the zoo, and its error."""

    adapter: str
    source: str
    modules: int
    separate_params: int
    core_params: int
    relative_error: float


@dataclass(kw_only=True)
class ZooReport(Result):
    """What :func:`compress_zoo` or :func:`add_to_zoo` built: per adapter and per group, and the storage."""

    output: str | None
    adapters: list[ZooAdapterReport]
    groups: list[dict[str, Any]]
    stored_params: int
    separate_params: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    zoo: ZooFiles | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in super().to_dict().items() if k != "zoo"}
        data["totals"] = {
            "stored_params": self.stored_params,
            "separate_params": self.separate_params,
            "compression": self.separate_params / max(self.stored_params, 1),
        }
        return data

    def text(self) -> str:
        rows = [
            {
                "adapter": a.adapter,
                "modules": a.modules,
                "separate params": a.separate_params,
                "core params": a.core_params,
                "rel. error": a.relative_error,
            }
            for a in self.adapters
        ]
        ratio = self.separate_params / max(self.stored_params, 1)
        lines = [
            format_table(rows),
            format_table(self.groups),
            *self.notes,
            f"{len(self.adapters)} adapters: {self.separate_params:,} params stored separately -> "
            f"{self.stored_params:,} in the zoo ({ratio:.1f}x smaller), {self.seconds:.2f} s"
            + (f"; wrote {self.output}" if self.output else ""),
        ]
        return "\n".join(lines)


def _report(zoo: ZooFiles, output: str | None, seconds: float, separate: dict[str, int], notes: list[str]) -> ZooReport:
    adapters = [
        ZooAdapterReport(
            adapter=name,
            source=entry.source,
            modules=len(entry.modules),
            separate_params=separate.get(name, entry.lora_params),
            core_params=zoo.core_params(name),
            relative_error=entry.relative_error,
        )
        for name, entry in zoo.adapters.items()
    ]
    groups = [
        {
            "group": name,
            "shape": list(g.shape),
            "rank": list(g.rank),
            "adapters": sum(name in a.groups for a in zoo.adapters.values()),
            "layers": len(g.modules),
        }
        for name, g in zoo.groups.items()
    ]
    return ZooReport(
        output=output,
        adapters=adapters,
        groups=groups,
        stored_params=zoo.n_params,
        separate_params=sum(a.separate_params for a in adapters),
        seconds=seconds,
        notes=notes,
        zoo=zoo,
    )


def _names(paths: list[str], names: list[str] | None) -> list[str]:
    chosen = list(names) if names is not None else [Path(p).resolve().name for p in paths]
    if len(chosen) != len(paths):
        raise ValueError(f"{len(chosen)} names for {len(paths)} sources")
    for name in chosen:
        if not _NAME.match(name):
            raise ValueError(f"adapter name {name!r} must be letters, digits, '_' or '-'")
    duplicates = sorted({n for n in chosen if chosen.count(n) > 1})
    if duplicates:
        raise ValueError(f"adapter names must be unique; repeated: {duplicates} (give --names)")
    return chosen


def _check_same_base(sources: dict[str, _Source]) -> dict[str, tuple[int, int]]:
    """Every module's shape across the sources; errors on other bases or mismatched shapes."""
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


def compress_zoo(
    sources: list[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    *,
    names: list[str] | None = None,
    rank: int | tuple[int, int] | None = None,
    energy: float | None = None,
    n_iter: int = 0,
    groups: str | dict[str, list[str]] = "by_name",
    force: bool = False,
    progress: Progress | None = None,
) -> ZooReport:
    """Compress adapters of one base into one shared Tucker-2 basis per group.

    Parameters
    ----------
    sources : list of paths
        PEFT LoRA folders or LoTR adapter folders, for the same base model. They may differ
        in rank, alpha, rslora, rank patterns and target modules.
    out_dir : path, optional
        The zoo folder to write, atomically (an existing one needs ``force``).
    names : list of str, optional
        One name per source (default: the folder names).
    rank, energy, n_iter, groups
        As in :func:`tensorlotr.convert_lora`, for the stack of every adapter's layers in a
        group: ``U`` (d_out, r_out) and ``V`` (d_in, r_in) are shared by all of them.
        ``rank=None`` keeps the exact rank (lossless).

    Returns
    -------
    ZooReport
        Per adapter: its separate size, the cores it adds, its exact relative error; per group:
        shape, rank and how many adapters use it; storage against the separate adapters.
        ``report.zoo`` holds the zoo in memory.
    """
    start = time.perf_counter()
    paths = [str(p) for p in sources]
    if not paths:
        raise ValueError("compress_zoo needs at least one source")
    check_output(out_dir, force, inputs=paths)
    requested = normalize_rank(rank)
    chosen = _names(paths, names)
    loaded = {name: _Source(path) for name, path in zip(chosen, paths, strict=True)}
    shapes = _check_same_base(loaded)
    zoo = _compress(loaded, shapes, requested, energy, n_iter, groups, progress or no_progress)
    notes = _clipped_notes(zoo, requested, energy)
    if out_dir is not None:
        with atomic_dir(out_dir, force=force) as tmp:
            write_zoo(tmp, zoo)
    separate = {name: s.n_params for name, s in loaded.items()}
    return _report(zoo, str(out_dir) if out_dir is not None else None, time.perf_counter() - start, separate, notes)


def _compress(
    sources: dict[str, _Source],
    shapes: dict[str, tuple[int, int]],
    rank: tuple[int, int] | None,
    energy: float | None,
    n_iter: int,
    groups: str | dict[str, list[str]],
    progress: Progress,
) -> ZooFiles:
    layouts: dict[str, GroupLayout] = {}
    tensors: dict[str, torch.Tensor] = {}
    members = {name: ZooAdapter(s.path, {}, s.n_params) for name, s in sources.items()}
    err_sq = {name: 0.0 for name in sources}
    ref_sq = {name: 0.0 for name in sources}
    ordered = dict(sorted(shapes.items(), key=lambda item: module_order(item[0])))
    plan = group_modules(ordered, groups)
    for group in progress(plan, "compressing", len(plan)):
        parts = []  # (adapter, its modules in this group, B list, A list, scales)
        for name, source in sources.items():
            modules = [m for m in group.modules if m in source.modules]
            if modules:
                parts.append((name, modules, *source.load(modules)))
        bs = [b for part in parts for b in part[2]]
        as_ = [a for part in parts for a in part[3]]
        scales = [s for part in parts for s in part[4]]
        (d_out, d_in), total = group.shape, sum(int(b.shape[1]) for b in bs)
        exact = (min(d_out, len(bs) * d_in, total), min(d_in, len(bs) * d_out, total))
        clipped = None if rank is None else (min(rank[0], exact[0]), min(rank[1], exact[1]))
        tucker = tucker2_lowrank(bs, as_, clipped, scale=scales, energy=energy, n_iter=n_iter)
        u, v = torch.as_tensor(tucker.out_factor), torch.as_tensor(tucker.in_factor)
        core = torch.as_tensor(tucker.core)
        tensors[factor_key(group.name, OUT_FACTOR)] = u.float().contiguous()
        tensors[factor_key(group.name, IN_FACTOR)] = v.float().contiguous()
        offset = 0
        for name, modules, b_list, a_list, s_list in parts:
            cores = core[offset : offset + len(modules)]
            offset += len(modules)
            for module, c in zip(modules, cores, strict=True):
                tensors[zoo_core_key(name, module)] = c.float().contiguous()
            members[name].groups[group.name] = modules
            norm_sq = lowrank_norm_sq(b_list, a_list, s_list)
            error = relative_error_lowrank(Tucker2(cores, u, v), b_list, a_list, s_list)
            err_sq[name] += error**2 * norm_sq
            ref_sq[name] += norm_sq
        fan_in_fan_out = any(sources[name].fan_in_fan_out for name, *_ in parts)
        layouts[group.name] = GroupLayout(list(group.modules), group.shape, tucker.rank, 1.0, fan_in_fan_out)
    for name, source in sources.items():
        saved = source.load_modules_to_save()
        for key, tensor in saved.items():
            tensors[zoo_saved_key(name, key)] = tensor
        members[name].modules_to_save = sorted({key.rsplit(".", 1)[0] for key in saved})
        members[name].relative_error = math.sqrt(err_sq[name] / ref_sq[name]) if ref_sq[name] > 0 else 0.0
    bases = {s.base for s in sources.values() if s.base}
    return ZooFiles(layouts, members, tensors, {"name_or_path": bases.pop() if bases else None})


def _clipped_notes(zoo: ZooFiles, rank: tuple[int, int] | None, energy: float | None) -> list[str]:
    if rank is None or energy is not None:
        return []
    return [
        f"group {name}: rank {rank[0]}x{rank[1]} is above its exact rank; kept {g.rank[0]}x{g.rank[1]}"
        for name, g in zoo.groups.items()
        if tuple(g.rank) != tuple(rank)
    ]


def add_to_zoo(
    zoo_dir: str | os.PathLike,
    source: str | os.PathLike,
    *,
    name: str | None = None,
    refit: bool = False,
    rank: int | tuple[int, int] | None = None,
    energy: float | None = None,
    n_iter: int = 0,
    progress: Progress | None = None,
) -> ZooReport:
    """Fold a new adapter into an existing zoo, rewriting the zoo folder atomically.

    By default the new adapter is projected onto the zoo's bases (``G_l = U^T dW_l V``), and
    no other adapter changes; a group the zoo lacks is decomposed on its own as a new group.
    With ``refit`` the whole zoo is compressed again, the existing adapters taken as the zoo
    holds them, at ``rank`` / ``energy`` (default: each group's current rank).

    Returns the zoo's report; the new adapter's row gives its exact relative error.
    """
    start = time.perf_counter()
    zoo = read_zoo(zoo_dir)
    chosen = _names([str(source)], [name] if name else None)[0]
    if chosen in zoo.adapters:
        raise ValueError(f"the zoo already has an adapter {chosen!r}; pass another name")
    new = _Source(source)
    if new.base and zoo.base_model.get("name_or_path") and new.base != zoo.base_model["name_or_path"]:
        raise ValueError(f"{source} adapts {new.base}, but the zoo is for {zoo.base_model['name_or_path']}")
    module_shapes = {m: tuple(g.shape) for g in zoo.groups.values() for m in g.modules}
    for module, shape in new.modules.items():
        if module in module_shapes and module_shapes[module] != shape:
            raise ValueError(f"module {module!r} is {shape} in {source} but {module_shapes[module]} in the zoo")
    if refit:
        existing = {n: _ZooMember(zoo, n) for n in zoo.adapters}
        sources: dict[str, Any] = {**existing, chosen: new}
        shapes = {**module_shapes, **new.modules}
        ranks = {tuple(g.rank) for g in zoo.groups.values()}
        target = normalize_rank(rank) if rank is not None else (ranks.pop() if len(ranks) == 1 else None)
        refitted = _compress(sources, shapes, target, energy, n_iter, _zoo_groups(zoo, shapes), progress or no_progress)
        for n, entry in zoo.adapters.items():
            refitted.adapters[n].source = entry.source
            refitted.adapters[n].lora_params = entry.lora_params
        zoo = refitted
    else:
        _project(zoo, chosen, new, progress or no_progress)
    with atomic_dir(zoo_dir, force=True) as tmp:
        write_zoo(tmp, zoo)
    separate = {n: a.lora_params for n, a in zoo.adapters.items()}
    return _report(zoo, str(zoo_dir), time.perf_counter() - start, separate, [])


def _zoo_groups(zoo: ZooFiles, shapes: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """The zoo's groups as explicit module lists, plus ``by_name`` groups for modules it lacks."""
    groups = {name: list(g.modules) for name, g in zoo.groups.items()}
    known = {m for modules in groups.values() for m in modules}
    for group in group_modules({m: s for m, s in shapes.items() if m not in known}, "by_name"):
        groups[group.name if group.name not in groups else f"{group.name}_new"] = list(group.modules)
    return groups


class _ZooMember:
    """An adapter already in a zoo, as LoRA factors ``B = U``, ``A = G_l V^T`` (for a refit)."""

    def __init__(self, zoo: ZooFiles, name: str) -> None:
        self.files = zoo.adapter(name)
        self.path = zoo.adapters[name].source
        self.modules = {m: tuple(g.shape) for g in self.files.groups.values() for m in g.modules}
        self.n_params = zoo.adapters[name].lora_params
        self.fan_in_fan_out = any(g.fan_in_fan_out for g in self.files.groups.values())
        self.base = zoo.base_model.get("name_or_path")

    def load(self, names: list[str]) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float]]:
        group_of = {m: g for g, layout in self.files.groups.items() for m in layout.modules}
        bs = [self.files.factor(group_of[m], OUT_FACTOR).double() for m in names]
        as_ = [self.files.core(m).double() @ self.files.factor(group_of[m], IN_FACTOR).double().T for m in names]
        return bs, as_, [1.0] * len(names)

    def load_modules_to_save(self) -> dict[str, torch.Tensor]:
        return self.files.modules_to_save


def _project(zoo: ZooFiles, name: str, source: _Source, progress: Progress) -> None:
    """Add adapter ``name`` to ``zoo`` by projecting it onto the zoo's bases (new groups decomposed alone)."""
    entry = ZooAdapter(source.path, {}, source.n_params)
    group_of = {m: g for g, layout in zoo.groups.items() for m in layout.modules}
    err_sq = ref_sq = 0.0
    by_group: dict[str | None, list[str]] = {}
    for module in sorted(source.modules, key=module_order):
        by_group.setdefault(group_of.get(module), []).append(module)
    new_modules = by_group.pop(None, [])
    for group, modules in progress(list(by_group.items()), "projecting", len(by_group)):
        bs, as_, scales = source.load(modules)
        u = zoo.tensors[factor_key(group, OUT_FACTOR)].double()
        v = zoo.tensors[factor_key(group, IN_FACTOR)].double()
        # the best cores for fixed factors: G_l = pinv(U) (s_l B_l A_l) pinv(V)^T, never forming B_l A_l
        pinv_u, pinv_v = torch.linalg.pinv(u), torch.linalg.pinv(v)
        cores = torch.stack([s * (pinv_u @ b) @ (a @ pinv_v.T) for b, a, s in zip(bs, as_, scales, strict=True)])
        for module, core in zip(modules, cores, strict=True):
            zoo.tensors[zoo_core_key(name, module)] = core.float().contiguous()
        entry.groups[group] = modules
        norm_sq = lowrank_norm_sq(bs, as_, scales)
        error = relative_error_lowrank(Tucker2(cores, u, v), bs, as_, scales)
        err_sq += error**2 * norm_sq
        ref_sq += norm_sq
    if new_modules:  # projection types the zoo lacks: decomposed alone, at full rank, as new groups
        shapes = {m: source.modules[m] for m in new_modules}
        extra = _compress({name: source}, shapes, None, None, 0, "by_name", progress)
        for group, layout in extra.groups.items():
            stored = group if group not in zoo.groups else f"{group}_{name}"
            zoo.groups[stored] = layout
            for which in (OUT_FACTOR, IN_FACTOR):
                zoo.tensors[factor_key(stored, which)] = extra.tensors[factor_key(group, which)]
            entry.groups[stored] = extra.adapters[name].groups[group]
            for module in entry.groups[stored]:
                zoo.tensors[zoo_core_key(name, module)] = extra.tensors[zoo_core_key(name, module)]
        bs, as_, scales = source.load(new_modules)
        ref_sq += lowrank_norm_sq(bs, as_, scales)  # exact: adds to the reference, not to the error
    for key, tensor in source.load_modules_to_save().items():
        zoo.tensors[zoo_saved_key(name, key)] = tensor
    entry.modules_to_save = sorted({k.rsplit(".", 1)[0] for k in source.load_modules_to_save()})
    entry.relative_error = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else 0.0
    zoo.adapters[name] = entry


def inspect_zoo(path: str | os.PathLike) -> ZooReport:
    """Per adapter its relative error and parameters, per group its shape and rank, and the total storage."""
    zoo = read_zoo(path)
    return _report(zoo, str(path), 0.0, {n: a.lora_params for n, a in zoo.adapters.items()}, [])
