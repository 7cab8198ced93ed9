"""Per-adapter residuals: private low-rank directions beside a zoo's shared basis.

An adapter whose update the shared basis of a group does not span (a narrow adapter in a zoo
of broad ones) gets private factors ``U_a`` (d_out, s_out) and ``V_a`` (d_in, s_in) in that
group: its layers become ``[U U_a] C_l [V V_a]^T`` with full cores ``C_l`` of
(r_out + s_out, r_in + s_in), so the shared and private directions mix freely. The private
directions are the Tucker-2 of what the shared basis leaves of the adapter,
``R_l = s_l B_l A_l - U G_l V^T``, taken in factored form (``[s_l B_l, -U G_l] [A_l; V^T]``,
never a dense ``d_out x d_in`` matrix), and orthogonalised against the shared ones; the cores
are then the least-squares optimum in the augmented basis, for the weight error or, with
calibration statistics, the calibrated output error. Everything is stored in the zoo and
counted in its size (:meth:`tensorlotr.adapter.layout.ZooFiles.core_params`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...adapter.layout import IN_FACTOR, OUT_FACTOR, ZooFiles, factor_key, zoo_core_key, zoo_residual_key
from ...core import Tucker2, tucker2_lowrank, tucker2_weighted
from ..calibration import Calibration, ErrorSums, error_sums
from .report import PairErrors
from .sources import Source

__all__ = ["fit_residual", "max_residual_rank", "residual_params"]


def max_residual_rank(zoo: ZooFiles, name: str, group: str, lora_ranks: Sequence[int]) -> tuple[int, int]:
    """The largest residual rank adapter ``name`` can use in ``group``: the basis's room, and its residuals' rank.

    The residual of layer ``l`` has rank at most ``r_l + r_in`` (its LoRA rank and the shared
    input rank), and the augmented basis cannot exceed the layer's shape.

    Examples
    --------
    >>> import torch
    >>> from tensorlotr.adapter.layout import GroupLayout, ZooAdapter
    >>> layout = GroupLayout(["layer.0.q", "layer.1.q"], shape=(32, 24), rank=(4, 4), scale=1.0)
    >>> zoo = ZooFiles({"q": layout}, {"a": ZooAdapter("lora-a", {"q": layout.modules})}, {})
    >>> max_residual_rank(zoo, "a", "q", [2, 2])
    (12, 12)
    """
    (d_out, d_in), (r_out, r_in) = zoo.groups[group].shape, zoo.groups[group].rank
    total = sum(int(r) + r_in for r in lora_ranks)
    return max(0, min(d_out - r_out, total)), max(0, min(d_in - r_in, total))


def residual_params(zoo: ZooFiles, name: str, group: str, rank: tuple[int, int]) -> int:
    """What a residual of ``rank`` (s_out, s_in) costs adapter ``name`` in ``group``: private factors and larger cores.

    Examples
    --------
    >>> from tensorlotr.adapter.layout import GroupLayout, ZooAdapter
    >>> layout = GroupLayout(["layer.0.q", "layer.1.q"], shape=(32, 24), rank=(4, 4), scale=1.0)
    >>> zoo = ZooFiles({"q": layout}, {"a": ZooAdapter("lora-a", {"q": layout.modules})}, {})
    >>> residual_params(zoo, "a", "q", (2, 2))  # 2 * 32 + 2 * 24 + 2 layers * (6 * 6 - 4 * 4)
    152
    """
    (d_out, d_in), (r_out, r_in) = zoo.groups[group].shape, zoo.groups[group].rank
    s_out, s_in = rank
    layers = len(zoo.adapters[name].groups[group])
    return s_out * d_out + s_in * d_in + layers * ((r_out + s_out) * (r_in + s_in) - r_out * r_in)


def fit_residual(
    zoo: ZooFiles,
    name: str,
    source: Source,
    ranks: dict[str, tuple[int, int]],
    errors: PairErrors,
    calibration: Calibration | None = None,
) -> None:
    """Give adapter ``name`` of ``zoo`` a residual of ``ranks[group]`` in each of those groups, in place.

    A rank of (0, 0) removes the adapter's residual in that group (its cores go back to the
    shared basis alone, refitted there). A rank is clipped to :func:`max_residual_rank`.
    ``calibration`` (its statistics collected) makes the fit minimise the calibrated output
    error, with the calibration's damping; ``errors[(name, group)]["compressed"]`` is updated.

    Examples
    --------
    ``lora-a/`` and ``lora-b/`` hold rank-4 LoRAs on ``q_proj`` and ``v_proj`` of one 2-layer
    base of hidden size 32; at zoo rank 2, a residual of the largest rank (2 layers x (4 + 2))
    makes adapter ``a`` exact, keeping the 10 directions that the shared 2 do not already span:

    >>> from tensorlotr.progress import no_progress
    >>> from tensorlotr.jobs.zoo.fit import fit_zoo
    >>> from tensorlotr.jobs.zoo.sources import check_same_base, read_source
    >>> sources = {"a": read_source("lora-a"), "b": read_source("lora-b")}
    >>> zoo, errors, _ = fit_zoo(sources, check_same_base(sources), (2, 2), None, 0, "by_name", no_progress)
    >>> before = errors[("a", "q_proj")]["compressed"].weight_error
    >>> fit_residual(zoo, "a", sources["a"], {"q_proj": (12, 12)}, errors)
    >>> zoo.adapters["a"].residual, zoo.rank_of("a", "q_proj")
    ({'q_proj': (10, 10)}, (12, 12))
    >>> before > 0.1, errors[("a", "q_proj")]["compressed"].weight_error < 1e-6
    (True, True)
    """
    entry = zoo.adapters[name]
    for group, wanted in ranks.items():
        modules = entry.groups[group]
        loaded_b, loaded_a, loaded_scales = source.load(modules)
        bs, as_, scales = [b.double() for b in loaded_b], [a.double() for a in loaded_a], list(loaded_scales)
        bound = max_residual_rank(zoo, name, group, [int(b.shape[1]) for b in bs])
        rank = (min(wanted[0], bound[0]), min(wanted[1], bound[1]))
        factors = _calibration_factors(calibration, modules)  # measure the output error
        fit_with = factors if calibration is not None and calibration.objective == "output" else None
        u = zoo.tensors[factor_key(group, OUT_FACTOR)].double()
        v = zoo.tensors[factor_key(group, IN_FACTOR)].double()
        damping = calibration.damping if calibration is not None else 0.0
        # the residual of the shared basis' own optimum (not of cores a heal has moved)
        shared = _cores_in_basis(u, v, bs, as_, scales, fit_with, damping)
        if min(rank) > 0:
            private_out, private_in = _private_directions(u, v, shared, bs, as_, scales, rank, fit_with, calibration)
            out_basis, in_basis = torch.cat([u, private_out], 1), torch.cat([v, private_in], 1)
            zoo.tensors[zoo_residual_key(name, group, OUT_FACTOR)] = private_out.float().contiguous()
            zoo.tensors[zoo_residual_key(name, group, IN_FACTOR)] = private_in.float().contiguous()
            entry.residual[group] = (int(private_out.shape[1]), int(private_in.shape[1]))
        else:
            out_basis, in_basis = u, v
            for which in (OUT_FACTOR, IN_FACTOR):
                zoo.tensors.pop(zoo_residual_key(name, group, which), None)
            entry.residual.pop(group, None)
        cores = _cores_in_basis(out_basis, in_basis, bs, as_, scales, fit_with, damping)
        for module, core in zip(modules, cores, strict=True):
            zoo.tensors[zoo_core_key(name, module)] = core.float().contiguous()
        tucker = zoo.adapter(name).tucker(group)
        errors.setdefault((name, group), {})["compressed"] = error_sums(tucker, bs, as_, scales, factors)
    mine = [e["compressed"] for (adapter, _), e in errors.items() if adapter == name and "compressed" in e]
    entry.relative_error = sum(mine, ErrorSums()).weight_error


def _calibration_factors(calibration: Calibration | None, modules: list[str]) -> list[torch.Tensor] | None:
    """Each module's calibration factor ``Z_l`` (float64) when the calibration minimises the output error."""
    if calibration is None or calibration.stats is None:
        return None
    return [z.double() for z in calibration.stats.factors(modules)]


def _private_directions(
    u: torch.Tensor,
    v: torch.Tensor,
    shared: list[torch.Tensor],
    bs: list[torch.Tensor],
    as_: list[torch.Tensor],
    scales: list[float],
    rank: tuple[int, int],
    factors: list[torch.Tensor] | None,
    calibration: Calibration | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``U_a`` (d_out, s_out), ``V_a`` (d_in, s_in): the residuals' Tucker-2 factors, orthogonal to ``U``, ``V``."""
    res_b = [torch.cat([s * b, -(u @ g)], 1) for b, g, s in zip(bs, shared, scales, strict=True)]
    res_a = [torch.cat([a, v.T], 0) for a in as_]
    found: Tucker2
    if factors is not None and calibration is not None:
        found = tucker2_weighted(res_b, res_a, factors, rank, damping=calibration.damping, n_iter=calibration.n_iter)
    else:
        found = tucker2_lowrank(res_b, res_a, rank)
    return _complement(u, torch.as_tensor(found.out_factor)), _complement(v, torch.as_tensor(found.in_factor))


def _complement(basis: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning what ``new`` adds to the span of ``basis`` (none numerically inside it)."""
    q, _ = torch.linalg.qr(basis)
    rest = new - q @ (q.T @ new)
    left, values, _ = torch.linalg.svd(rest, full_matrices=False)
    scale = float(torch.linalg.matrix_norm(new, ord=2)) if new.numel() else 0.0
    keep = values > 1e-6 * max(scale, 1e-300)  # what is left of a direction inside the basis is rounding
    kept: torch.Tensor = left[:, keep]
    return kept


def _cores_in_basis(
    out_basis: torch.Tensor,
    in_basis: torch.Tensor,
    bs: list[torch.Tensor],
    as_: list[torch.Tensor],
    scales: list[float],
    factors: list[torch.Tensor] | None,
    damping: float,
) -> list[torch.Tensor]:
    """Each layer's least-squares core ``C_l`` in the basis ``P`` (d_out, p), ``Q`` (d_in, q): (p, q) each.

    The weight error: ``C_l = P^+ dW_l Q^{+T}``; the calibrated output error with
    ``W_l = Z_l Z_l^T + mu I`` (``mu = damping ||Z_l||^2 / d_in``):
    ``C_l = P^+ dW_l W_l Q (Q^T W_l Q)^{-1}``. Factored throughout (``dW_l = s_l B_l A_l``).
    """
    left = torch.linalg.pinv(out_basis)  # (p, d_out)
    cores = []
    for i, (b, a, s) in enumerate(zip(bs, as_, scales, strict=True)):
        pb = s * (left @ b)  # (p, r)
        if factors is None:
            cores.append(pb @ (a @ torch.linalg.pinv(in_basis).T))
            continue
        z = factors[i]
        mu = damping * float(z.square().sum()) / z.shape[0]
        qz = in_basis.T @ z  # (q, k)
        gram = qz @ qz.T + mu * (in_basis.T @ in_basis)
        rhs = pb @ ((a @ z) @ qz.T + mu * (a @ in_basis))  # P^+ dW W Q
        cores.append(torch.linalg.lstsq(gram.T, rhs.T).solution.T)
    return cores
