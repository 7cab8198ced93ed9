"""The zoo's report: per adapter and per group what a zoo holds and what compressing into it cost.

:class:`ZooReport` is what :func:`tensorlotr.zoo.compress_zoo`, :func:`tensorlotr.zoo.add_to_zoo`
and :func:`tensorlotr.zoo.inspect_zoo` return; :func:`zoo_report` assembles it from a zoo in
memory and the error sums of each (adapter, group) pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...adapter.layout import ZooFiles
from ...report import Result, format_table
from ..calibration import ErrorSums

#: Error sums per (adapter, group): ``"compressed"`` after the fit, ``"healed"`` after a heal.
PairErrors = dict[tuple[str, str], dict[str, ErrorSums]]


@dataclass
class ZooAdapterReport:
    """One adapter of a zoo: its modules, its separate size, what it adds to the zoo, and its errors.

    ``relative_error`` is its weight error; with calibration ``output_error`` is its calibrated
    output error (both relative to its own size), and after a heal ``healed_error`` and
    ``healed_output_error`` are the same for the healed cores, and ``heal`` is its heal report.
    ``residual`` gives the rank of its private residual per group; with held-out inputs
    ``agreement`` and ``retained_gain`` are its held-out retention (``retention`` in full).

    Examples
    --------
    >>> row = ZooAdapterReport("sst2", "loras/sst2", modules=24, separate_params=73_728, core_params=1_536,
    ...                        relative_error=0.05)
    >>> row.adapter, row.output_error
    ('sst2', None)
    """

    adapter: str
    source: str
    modules: int
    separate_params: int
    core_params: int
    relative_error: float
    output_error: float | None = None
    healed_error: float | None = None
    healed_output_error: float | None = None
    heal: dict[str, Any] | None = None
    residual: dict[str, list[int]] | None = None  # group -> private residual rank [s_out, s_in]
    agreement: float | None = None  # held-out: share of predictions equal to its LoRA's
    retained_gain: float | None = None  # held-out, with labels: share of the LoRA's gain kept
    retention: dict[str, Any] | None = None  # held-out retention in full (tensorlotr.nn.evaluate.Retention)


@dataclass(kw_only=True)
class ZooReport(Result):
    """What :func:`compress_zoo` or :func:`add_to_zoo` built: per adapter and per group, and the storage.

    Examples
    --------
    >>> row = ZooAdapterReport("sst2", "loras/sst2", modules=24, separate_params=73_728, core_params=1_536,
    ...                        relative_error=0.05)
    >>> groups = [{"group": "query", "shape": [384, 384], "rank": [16, 16], "adapters": 1, "layers": 12}]
    >>> report = ZooReport(output=None, adapters=[row], groups=groups, stored_params=13_824, separate_params=73_728)
    >>> report.to_dict()["totals"]["compression"]
    5.333333333333333
    >>> print(report.text().splitlines()[-1])
    1 adapters: 73,728 params stored separately -> 13,824 in the zoo (5.3x smaller), 0.00 s
    """

    output: str | None
    adapters: list[ZooAdapterReport]
    groups: list[dict[str, Any]]
    stored_params: int
    separate_params: int
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    adapter_groups: list[dict[str, Any]] = field(default_factory=list)  # errors per adapter and group
    calibration: dict[str, Any] | None = None
    path: str | None = None  # the zoo read, for inspect (which writes nothing: ``output`` is None)
    zoo: ZooFiles | None = field(default=None, repr=False, metadata={"json": False})  # the zoo read, in memory

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["totals"] = {
            "stored_params": self.stored_params,
            "separate_params": self.separate_params,
            "compression": self.separate_params / max(self.stored_params, 1),
        }
        return data

    def text(self) -> str:
        rows = []
        for a in self.adapters:
            row = {
                "adapter": a.adapter,
                "modules": a.modules,
                "separate params": a.separate_params,
                "core params": a.core_params,
                "rel. error": a.relative_error,
            }
            for key, column in ERROR_COLUMNS.items():
                if any(getattr(b, key) is not None for b in self.adapters):
                    row[column] = getattr(a, key) if getattr(a, key) is not None else ""
            if a.heal is not None:
                row["healed end-to-end"] = f"{a.heal['error_before']:.3f} -> {a.heal['error_after']:.3f}"
            if any(b.residual for b in self.adapters):
                ranks = sorted({f"{r[0]}x{r[1]}" for r in (a.residual or {}).values()})
                row["residual"] = "/".join(ranks)
            rows.append(row)
        ratio = self.separate_params / max(self.stored_params, 1)
        lines = [
            *([f"{self.path}: LoTR zoo"] if self.path else []),
            format_table(rows),
            format_table(self.groups),
            *self.notes,
            f"{len(self.adapters)} adapters: {self.separate_params:,} params stored separately -> "
            f"{self.stored_params:,} in the zoo ({ratio:.1f}x smaller), {self.seconds:.2f} s"
            + (f"; wrote {self.output}" if self.output else ""),
        ]
        return "\n".join(lines)


#: The error columns of a zoo's adapter table beside its weight error: field -> column title.
ERROR_COLUMNS = {
    "output_error": "output error",
    "healed_error": "healed rel. error",
    "healed_output_error": "healed output error",
    "agreement": "held-out agreement",
    "retained_gain": "held-out retained gain",
}


def zoo_report(
    zoo: ZooFiles,
    output: str | None,
    seconds: float,
    separate: dict[str, int],
    notes: list[str],
    errors: PairErrors | None = None,
) -> ZooReport:
    """The report of ``zoo``; ``errors[(adapter, group)]`` holds ``"compressed"`` and ``"healed"`` sums.

    ``separate`` gives each adapter's separate size (default: its ``lora_params`` in the zoo).

    Examples
    --------
    A zoo of one adapter ``a`` with one group of two (6, 5) layers at rank (3, 2):

    >>> import torch
    >>> from tensorlotr.adapter.layout import GroupLayout, ZooAdapter, factor_key, zoo_core_key
    >>> layout = GroupLayout(["layer.0.query", "layer.1.query"], shape=(6, 5), rank=(3, 2), scale=1.0)
    >>> u, v = torch.randn(6, 3), torch.randn(5, 2)  # U (d_out, r_out), V (d_in, r_in)
    >>> tensors = {factor_key("query", "out_factor"): u, factor_key("query", "in_factor"): v}
    >>> tensors |= {zoo_core_key("a", m): torch.randn(3, 2) for m in layout.modules}
    >>> zoo = ZooFiles({"query": layout}, {"a": ZooAdapter("lora-a", {"query": layout.modules}, 120)}, tensors)
    >>> errors = {("a", "query"): {"compressed": ErrorSums(weight=1.0, weight_ref=100.0)}}
    >>> report = zoo_report(zoo, None, 0.0, {}, [], errors)
    >>> report.stored_params, report.separate_params, report.groups[0]["relative_error"]
    (40, 120, 0.1)
    """
    errors = errors or {}

    def total(name: str, stage: str, by: int = 0) -> ErrorSums | None:
        found = [e[stage] for key, e in errors.items() if key[by] == name and stage in e]
        return sum(found, ErrorSums()) if found else None

    adapters = []
    for name, entry in zoo.adapters.items():
        compressed, healed = total(name, "compressed"), total(name, "healed")
        adapters.append(
            ZooAdapterReport(
                adapter=name,
                source=entry.source,
                modules=len(entry.modules),
                separate_params=separate.get(name, entry.lora_params),
                core_params=zoo.core_params(name),
                relative_error=entry.relative_error,
                output_error=compressed.output_error if compressed is not None else None,
                healed_error=healed.weight_error if healed is not None else None,
                healed_output_error=healed.output_error if healed is not None else None,
                residual={g: list(r) for g, r in entry.residual.items()} or None,
            )
        )
    groups = []
    for name, g in zoo.groups.items():
        row: dict[str, Any] = {
            "group": name,
            "shape": list(g.shape),
            "rank": list(g.rank),
            "adapters": sum(name in a.groups for a in zoo.adapters.values()),
            "layers": len(g.modules),
        }
        compressed = total(name, "compressed", by=1)
        if compressed is not None:
            row["relative_error"] = compressed.weight_error
            if compressed.output_error is not None:
                row["output_error"] = compressed.output_error
        groups.append(row)
    per_pair = [
        {
            "adapter": adapter,
            "group": group,
            **{f"{stage}_{k}": v for stage, sums in e.items() for k, v in _figures(sums).items()},
        }
        for (adapter, group), e in errors.items()
    ]
    return ZooReport(
        output=output,
        adapters=adapters,
        groups=groups,
        stored_params=zoo.n_params,
        separate_params=sum(a.separate_params for a in adapters),
        seconds=seconds,
        notes=notes,
        adapter_groups=per_pair,
        zoo=zoo,
    )


def _figures(sums: ErrorSums) -> dict[str, float]:
    """``relative_error`` and, with calibration, ``output_error`` of some layers."""
    out = {"relative_error": sums.weight_error}
    if sums.output_error is not None:
        out["output_error"] = sums.output_error
    return out
