"""Adding to a zoo: one more adapter folded into an existing zoo, projected or refitted (``add_to_zoo``).

By default the new adapter is projected onto the zoo's bases (its cores are the best for the
fixed factors) and no other adapter changes; a group the zoo lacks is decomposed alone as a
new group. With ``refit`` the whole zoo is fitted again (:func:`~tensorlotr.jobs.zoo.fit.fit_zoo`),
the existing adapters taken as the zoo holds them.
"""

from __future__ import annotations

import math
import os
import time

import torch

from ...adapter import group_modules, module_order
from ...adapter.layout import IN_FACTOR, OUT_FACTOR, ZooAdapter, ZooFiles, factor_key, zoo_core_key
from ...core import Tucker2, lowrank_norm_sq, normalize_rank, relative_error_lowrank
from ...files.atomic import atomic_update, recover_leftovers, resolve_folder
from ...files.lock import DEFAULT_TIMEOUT, write_lock
from ...io.zoo_format import ZOO_CONFIG_NAME, ZOO_WEIGHTS_NAME, read_zoo, write_zoo
from ...progress import Progress, no_progress
from ..calibration import ErrorSums, error_sums
from ..compression_report import REPORT_NAME
from .fit import fit_zoo, store_modules_to_save
from .report import PairErrors, ZooReport, zoo_report
from .residual import fit_residual
from .sources import Source, adapter_names, check_same_base, read_source, zoo_member


def add_to_zoo(
    zoo_dir: str | os.PathLike[str],
    source: str | os.PathLike[str],
    *,
    name: str | None = None,
    refit: bool = False,
    rank: int | tuple[int, int] | None = None,
    energy: float | None = None,
    n_iter: int = 0,
    progress: Progress | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    residual_rank: int | None = None,
) -> ZooReport:
    """Fold a new adapter into an existing zoo, rewriting the zoo folder atomically.

    By default the new adapter is projected onto the zoo's bases (``G_l = U^T dW_l V``), and
    no other adapter changes; a group the zoo lacks is decomposed on its own as a new group.
    With ``refit`` the whole zoo is compressed again, the existing adapters taken as the zoo
    holds them, at ``rank`` / ``energy`` (default: each group's current rank); ``rank``,
    ``energy`` and ``n_iter`` apply to a refit only.

    The adapter must be of the zoo's base (its name, module paths and shapes, as in
    :func:`~tensorlotr.jobs.zoo.compress_zoo`). The zoo is changed as one writer at a time
    (its lock file ``.ZOO.lock``, waited for up to ``timeout`` seconds) and replaced in one
    step; a symbolic link to it is followed, and its other files (a ``NOTES.md``, its
    ``compression_report.json``, the source itself if it lies inside) are kept, except that a
    refit drops the compression report, whose errors no longer apply.

    Returns the zoo's report; the new adapter's row gives its exact relative error.

    Examples
    --------
    ``lora-a/`` and ``lora-b/`` hold rank-4 LoRAs on ``q_proj`` and ``v_proj`` of one 2-layer
    base of hidden size 32; ``lora-b`` is projected onto the bases of a zoo of ``lora-a`` at
    its exact rank (2 layers of rank 4: 8), which hold ``lora-a`` exactly and ``lora-b`` in part:

    >>> from tensorlotr.jobs.zoo import compress_zoo
    >>> _ = compress_zoo(["lora-a"], "my-zoo", rank=8)
    >>> report = add_to_zoo("my-zoo", "lora-b")
    >>> [(a.adapter, a.core_params) for a in report.adapters]  # 4 cores of 8x8 each
    [('lora-a', 256), ('lora-b', 256)]
    >>> report.adapters[0].relative_error < 1e-6, 0 < report.adapters[1].relative_error < 1
    (True, True)
    """
    start = time.perf_counter()
    if residual_rank is not None and (isinstance(residual_rank, bool) or not isinstance(residual_rank, int)
                                      or residual_rank < 0):  # fmt: skip
        raise ValueError(f"residual_rank must be a whole number >= 0, got {residual_rank!r}")
    if refit and residual_rank:
        raise ValueError("residual_rank (--residual-rank) applies to a projection; a refit fits every adapter again")
    if not refit and (rank is not None or energy is not None or n_iter):
        raise ValueError(
            "rank, energy and n_iter (--rank, --energy, --hooi-iters) apply to a refit only (--refit); "
            "a projection keeps the zoo's bases and ranks"
        )
    chosen = adapter_names([str(source)], [name] if name else None)[0]
    recover_leftovers(zoo_dir)
    real = resolve_folder(zoo_dir)  # a link to the zoo: the real zoo gets the adapter
    with write_lock(real, timeout=timeout):
        zoo = read_zoo(real)
        if chosen in zoo.adapters:
            raise ValueError(f"the zoo already has an adapter {chosen!r}; pass another name")
        new = read_source(source)
        _check_fits(zoo, new, chosen, source)
        replaced = [ZOO_CONFIG_NAME, ZOO_WEIGHTS_NAME]
        notes = []
        if refit and (real / REPORT_NAME).is_file():
            replaced.append(REPORT_NAME)
            notes.append(f"removed {REPORT_NAME}: the refit changed every adapter, its errors no longer apply")
        with atomic_update(real, replaced=replaced, timeout=timeout) as tmp:
            if refit:
                zoo = _refit(zoo, chosen, new, rank, energy, n_iter, progress or no_progress)
            else:
                _project(zoo, chosen, new, progress or no_progress)
                if residual_rank:
                    _add_residual(zoo, chosen, new, residual_rank)
            write_zoo(tmp, zoo)
    separate = {n: a.lora_params for n, a in zoo.adapters.items()}
    return zoo_report(zoo, str(zoo_dir), time.perf_counter() - start, separate, notes)


def _check_fits(zoo: ZooFiles, new: Source, name: str, source: str | os.PathLike[str]) -> None:
    """Refuse an adapter of another base than the zoo's (its name, module paths or shapes), as ``compress_zoo`` does."""
    base = zoo.base_model.get("name_or_path")
    if new.base and base and new.base != base:
        raise ValueError(f"{source} adapts {new.base}, but the zoo is for {base}")
    members: dict[str, Source] = {n: zoo_member(zoo, n) for n in zoo.adapters}
    try:
        check_same_base({**members, name: new})
    except ValueError as exc:
        raise ValueError(f"{source} does not fit the zoo: {exc}") from None


def _refit(
    zoo: ZooFiles,
    name: str,
    new: Source,
    rank: int | tuple[int, int] | None,
    energy: float | None,
    n_iter: int,
    progress: Progress,
) -> ZooFiles:
    """The zoo fitted again with ``new`` (adapter ``name``), the existing adapters taken as the zoo holds them."""
    existing: dict[str, Source] = {n: zoo_member(zoo, n) for n in zoo.adapters}
    module_shapes = {m: g.shape for g in zoo.groups.values() for m in g.modules}
    shapes = {**module_shapes, **new.modules}
    ranks = {g.rank for g in zoo.groups.values()}
    target = normalize_rank(rank) if rank is not None else (ranks.pop() if len(ranks) == 1 else None)
    groups = _zoo_groups(zoo, shapes)
    refitted, _, _ = fit_zoo({**existing, name: new}, shapes, target, energy, n_iter, groups, progress)
    return refitted


def _add_residual(zoo: ZooFiles, name: str, source: Source, size: int) -> None:
    """Give the projected adapter ``name`` a residual of rank ``size`` in its groups that other adapters share."""
    shared = [g for g in zoo.adapters[name].groups if any(g in a.groups for n, a in zoo.adapters.items() if n != name)]
    errors: PairErrors = {}
    fit_residual(zoo, name, source, {g: (size, size) for g in shared}, errors)
    total = ErrorSums()
    for group, modules in zoo.adapters[name].groups.items():
        bs, as_, scales = source.load(modules)
        total = total + error_sums(zoo.adapter(name).tucker(group), bs, as_, scales)
    zoo.adapters[name].relative_error = total.weight_error


def _zoo_groups(zoo: ZooFiles, shapes: dict[str, tuple[int, int]]) -> dict[str, list[str]]:
    """The zoo's groups as explicit module lists, plus ``by_name`` groups for modules it lacks."""
    groups = {name: list(g.modules) for name, g in zoo.groups.items()}
    known = {m for modules in groups.values() for m in modules}
    for group in group_modules({m: s for m, s in shapes.items() if m not in known}, "by_name"):
        groups[group.name if group.name not in groups else f"{group.name}_new"] = list(group.modules)
    return groups


def _project(zoo: ZooFiles, name: str, source: Source, progress: Progress) -> None:
    """Add adapter ``name`` to ``zoo`` by projecting it onto the zoo's bases (new groups decomposed alone)."""
    entry = ZooAdapter(source.path, {}, source.n_params)
    group_of = {m: g for g, layout in zoo.groups.items() for m in layout.modules}
    err_sq = ref_sq = 0.0
    by_group: dict[str, list[str]] = {}
    new_modules: list[str] = []  # modules of projection types the zoo lacks
    for module in sorted(source.modules, key=module_order):
        if module in group_of:
            by_group.setdefault(group_of[module], []).append(module)
        else:
            new_modules.append(module)
    for group, modules in progress(list(by_group.items()), "projecting", len(by_group)):
        bs, as_, scales = source.load(modules)
        bs, as_ = [b.double() for b in bs], [a.double() for a in as_]  # the projection in float64
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
        extra, _, _ = fit_zoo({name: source}, shapes, None, None, 0, "by_name", progress)
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
    store_modules_to_save(zoo.tensors, name, entry, source.load_modules_to_save())
    entry.relative_error = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else 0.0
    zoo.adapters[name] = entry
