"""``LoTRPeftConfig``: LoTR's ``PeftConfig``, the one-line swap for ``LoraConfig`` in PEFT, TRL and Trainer code."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar

from peft import PeftConfig

from ..adapter import LoTRConfig
from ..core import normalize_rank

__all__ = ["LOTR", "LoTRPeftConfig", "LoTRPeftType"]


class LoTRPeftType(str, enum.Enum):  # noqa: UP042  (PeftType's str(): "LoTRPeftType.LOTR")
    """LoTR's ``peft_type``: a ``str`` enum made as PEFT's ``PeftType`` is, holding the one value ``"LOTR"``.

    It is a ``str`` equal to ``"LOTR"`` (and hashes as it), so PEFT's tables find it by the
    string read from ``adapter_config.json``; it has ``.value``, and ``str()`` gives
    ``"LoTRPeftType.LOTR"``, as PEFT's members do (PEFT's status helpers read the name after the dot).

    Examples
    --------
    >>> LOTR == "LOTR", LOTR.value, {"LOTR": 1}[LOTR], str(LOTR).partition(".")[-1]
    (True, 'LOTR', 1, 'LOTR')
    """

    LOTR = "LOTR"


#: The ``peft_type`` of LoTR adapters.
LOTR = LoTRPeftType.LOTR

#: The fields this config shares with :class:`tensorlotr.LoTRConfig`, with the same meaning.
SHARED_FIELDS = (
    "rank",
    "alpha",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "groups",
    "init",
    "dropout",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "adapter_dtype",
    "task_type",
    "inference_mode",
)


@dataclass
class LoTRPeftConfig(PeftConfig):
    """The configuration of a LoTR adapter as a PEFT method: ``dW_l = alpha / min(r_out, r_in) * U G_l V^T``.

    Each group (a stack of same-shaped target layers) holds ``U`` (d_out, r_out) and ``V``
    (d_in, r_in) once, at model level, and each layer its core ``G_l`` (r_out, r_in); all are
    trained. Pass it wherever PEFT takes a ``LoraConfig``: ``peft.get_peft_model``, TRL's
    ``SFTTrainer(peft_config=...)``, ``PeftModel.add_adapter``. The fields are those of
    :class:`tensorlotr.LoTRConfig` (see there), plus PEFT's own (``task_type``,
    ``inference_mode``, ``base_model_name_or_path``, ``revision``, ``trainable_token_indices``).

    Parameters
    ----------
    rank : int or (r_out, r_in)
        Tucker-2 ranks of each group.
    alpha : float
        Scale numerator: the update is ``alpha / min(r_out, r_in) * U G_l V^T``.
    target_modules : list of str or str, optional
        As in PEFT: name suffixes, a regex matched in full, or ``"all-linear"`` (every Linear and
        Conv1D but the output head; with ``task_type="SEQ_CLS"`` the classifier goes to
        ``modules_to_save``). ``None``: the names in ``groups`` when it is a dict, else a default
        for known model types (``q_proj`` and ``v_proj`` for Llama).
    exclude_modules, layers_to_transform, layers_pattern
        As in PEFT.
    groups : "by_name", "shared" or dict of str to list of str
        How targets stack into groups (see :class:`tensorlotr.LoTRConfig`).
    init : "zeros", "normal" or "svd"
        How the factors start; the cores start at zero, so the adapter starts at exactly zero.
    dropout : float
        Dropout on the adapter's input.
    modules_to_save : list of str, optional
        Modules trained in full and saved with the adapter, as in PEFT.
    rank_pattern, alpha_pattern : dict, optional
        Overrides of ``rank`` and ``alpha`` by module regex or group name.
    adapter_dtype : str, optional
        Dtype of factors and cores; ``None``: float32 (float64 on a float64 base).
    trainable_token_indices : list of int or dict, optional
        PEFT's trainable tokens of the embeddings (what TRL sets for added chat tokens).
    lotr_layout : dict, optional
        The groups as they were built: each group's modules in stack order, shape, rank and
        scale. ``LoTRModel.save_pretrained`` writes it into ``adapter_config.json`` (see
        :mod:`tensorlotr.io.peft_lotr`), so that PEFT rebuilds exactly the adapter that was
        saved; with it the tuner adapts those modules and no others. ``None`` (a new config):
        the groups are planned from the fields above.

    Examples
    --------
    The TRL line ``peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")``
    becomes:

    >>> from tensorlotr.peft import LoTRPeftConfig
    >>> config = LoTRPeftConfig(rank=8, alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    >>> config.peft_type, config.rank
    (<LoTRPeftType.LOTR: 'LOTR'>, (8, 8))
    >>> config.to_lotr_config().scale_of("q_proj")  # alpha / min(r_out, r_in)
    2.0
    >>> LoTRPeftConfig.from_lotr_config(config.to_lotr_config()) == config
    True
    """

    rank: int | tuple[int, int] | list[int] = field(
        default=8, metadata={"help": "Tucker-2 ranks (r_out, r_in) of each group; an int means equal ranks."}
    )
    alpha: float = field(default=8.0, metadata={"help": "Scale numerator: updates are alpha / min(r_out, r_in)."})
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module name suffixes, one regex matched in full, or 'all-linear', as in PEFT."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules never adapted: suffixes or one regex, as target_modules."}
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only the layers with these indices, as in PEFT."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "The name of the layer list ('layers', 'h'), as in PEFT."}
    )
    groups: str | dict[str, list[str]] = field(
        default="by_name",
        metadata={"help": "'by_name' (a group per target name), 'shared' (per shape) or {group: patterns}."},
    )
    init: str = field(default="zeros", metadata={"help": "Factors: 'zeros' (orthonormal), 'normal' or 'svd'."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter, as in PEFT."}
    )
    rank_pattern: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Ranks by module regex or group name."}
    )
    alpha_pattern: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Alphas by module regex or group name."}
    )
    adapter_dtype: str | None = field(
        default=None, metadata={"help": "'float32', 'float64', 'bfloat16', 'float16'; None: float32."}
    )
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None, metadata={"help": "PEFT's trainable tokens of the embedding layers."}
    )
    lotr_layout: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "The groups exactly as built (modules, shape, rank, scale), as tensorlotr.LoTRModel saves them; "
            "None: the groups are planned from the fields above."
        },
    )

    #: PEFT reads this of every config; LoTR adapts modules, never bare parameters.
    target_parameters: ClassVar[None] = None

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[no-untyped-call]
        self.peft_type = LOTR
        self.rank = normalize_rank(self.rank)  # type: ignore[assignment]
        self.rank_pattern = {k: normalize_rank(v) for k, v in self.rank_pattern.items()}
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (tuple, set)):
            self.modules_to_save = list(self.modules_to_save)
        self._lotr_config()  # LoTRConfig's checks: ranks, init, groups, dropout, dtype, patterns

    def _lotr_config(self) -> LoTRConfig:
        values = {name: getattr(self, name) for name in SHARED_FIELDS}
        if isinstance(values["target_modules"], set):  # PEFT expands "all-linear" into a set of module names
            values["target_modules"] = sorted(values["target_modules"])
        if values["task_type"] is not None:
            values["task_type"] = str(getattr(values["task_type"], "value", values["task_type"]))
        if isinstance(values["modules_to_save"], list):
            values["modules_to_save"] = list(dict.fromkeys(values["modules_to_save"]))
        return LoTRConfig(**values)

    def to_lotr_config(self) -> LoTRConfig:
        """This config as a :class:`tensorlotr.LoTRConfig` (what ``get_lotr_model`` and ``LoTRModel`` take).

        Raises ``ValueError`` when it sets ``trainable_token_indices``, which ``LoTRModel`` lacks.

        Examples
        --------
        >>> LoTRPeftConfig(rank=(16, 8), target_modules=["q_proj"]).to_lotr_config().rank_of("q_proj")
        (16, 8)
        """
        if self.trainable_token_indices is not None:
            raise ValueError(
                "trainable_token_indices is a PEFT feature that LoTRModel does not have; train the adapter as a PEFT "
                "model, or leave trainable_token_indices unset"
            )
        return self._lotr_config()

    @classmethod
    def from_lotr_config(cls, config: LoTRConfig, **kwargs: Any) -> LoTRPeftConfig:
        """The PEFT config of a :class:`tensorlotr.LoTRConfig`; ``kwargs`` set PEFT's own fields or override.

        Keys the LoTRConfig keeps in ``extra`` (from a newer tensorlotr) are not carried over.

        Examples
        --------
        >>> from tensorlotr import LoTRConfig
        >>> lotr_config = LoTRConfig(rank=4, target_modules=["query"])
        >>> peft_config = LoTRPeftConfig.from_lotr_config(lotr_config, inference_mode=True)
        >>> peft_config.rank, peft_config.inference_mode
        ((4, 4), True)
        """
        values = {name: getattr(config, name) for name in SHARED_FIELDS}
        return cls(**{**values, **kwargs})
