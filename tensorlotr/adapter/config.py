"""``LoTRConfig``: what to adapt, at which rank, and how to start."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..core import normalize_rank

INITS = ("zeros", "normal", "svd")
GROUP_MODES = ("by_name", "shared")

#: Targets used when ``target_modules`` is None, by ``model.config.model_type`` (as PEFT's defaults).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
}

Rank = int | tuple[int, int]


@dataclass
class LoTRConfig:
    """Configuration of LoTR adapters, JSON-serialisable like PEFT's configs.

    Parameters
    ----------
    rank : int or (r_out, r_in)
        Tucker-2 ranks of each group: ``U`` is (d_out, r_out), ``V`` is (d_in, r_in).
    alpha : float
        Scale numerator: the adapter adds ``alpha / r * U G_l V^T`` with
        ``r = min(r_out, r_in)``, the rank of the equivalent LoRA (so exporting to PEFT
        with ``lora_alpha = alpha`` keeps the same scaling).
    target_modules : list of str or str, optional
        Module name suffixes (``"query"`` matches ``….attention.self.query``), or one
        regular expression matched against the full name, as in PEFT. ``None`` picks a
        default for known model types.
    layers_to_transform : int or list of int, optional
        Only modules whose layer index (the first number in the name) is listed.
    groups : "by_name", "shared" or dict of str to list of str
        How targets are stacked into tensors. ``"by_name"``: one tensor per target name
        across layers (all ``query`` projections form one stack). ``"shared"``: one tensor
        for all targets of the same shape (query and value share U and V, as in the
        paper's RoBERTa set-up). A dict maps group names to patterns (suffixes or regexes).
    init : "zeros", "normal" or "svd"
        ``"zeros"``: zero cores, random orthonormal factors (the adapter starts at exactly
        zero). ``"normal"``: zero cores, Gaussian factors with std ``1/sqrt(d)``, as in
        the original code. ``"svd"``: factors from the Tucker-2 of the pretrained weights of
        the group, zero cores.
    dropout : float
        Dropout on the adapter's input.
    modules_to_save : list of str, optional
        Modules (name suffixes) trained in full and saved with the adapter, e.g.
        ``["classifier"]``.
    rank_pattern, alpha_pattern : dict of str, optional
        Per-group overrides of ``rank`` and ``alpha``, keyed by group name.
    """

    rank: Rank = 8
    alpha: float = 8.0
    target_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    groups: str | dict[str, list[str]] = "by_name"
    init: str = "zeros"
    dropout: float = 0.0
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, Rank] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rank = normalize_rank(self.rank)  # type: ignore[assignment]
        self.rank_pattern = {k: normalize_rank(v) for k, v in self.rank_pattern.items()}  # type: ignore[misc]
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if isinstance(self.groups, str) and self.groups not in GROUP_MODES:
            raise ValueError(f"groups must be one of {GROUP_MODES} or a dict of patterns, got {self.groups!r}")
        if isinstance(self.groups, dict):
            self.groups = {str(k): [v] if isinstance(v, str) else list(v) for k, v in self.groups.items()}
            for name in self.groups:
                if not name or "." in name:
                    raise ValueError(f"group names must be non-empty and contain no '.', got {name!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if float(self.alpha) <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha!r}")

    def rank_of(self, group: str) -> tuple[int, int]:
        """``(r_out, r_in)`` of ``group``."""
        return self.rank_pattern.get(group, self.rank)  # type: ignore[return-value]

    def scale_of(self, group: str) -> float:
        """``alpha / min(r_out, r_in)`` of ``group``."""
        return float(self.alpha_pattern.get(group, self.alpha)) / min(self.rank_of(group))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ranks become lists."""
        out = dataclasses.asdict(self)
        out["rank"] = list(self.rank)  # type: ignore[arg-type]
        out["rank_pattern"] = {k: list(v) for k, v in self.rank_pattern.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoTRConfig:
        """The inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown LoTRConfig fields: {sorted(unknown)}")
        return cls(**data)
