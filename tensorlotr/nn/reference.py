"""TRL's side of a :class:`tensorlotr.LoTRModel`: the reference model for DPO, and TRL's fused LM head adopted.

:class:`LoTRReferenceModel` is the base model of a ``LoTRModel`` with its adapters disabled,
sharing every weight (TRL's ``ref_model``, as it uses a ``PeftModel`` with its adapter
disabled). :func:`is_fused_lm_head` recognises TRL's ``add_fused_lm_head`` patch of a
model's forward, and :func:`adopt_fused_lm_head`, the body of ``LoTRModel._adopt_fused_lm_head``,
applies it to the base model, where the backbone and the head are.
"""

from __future__ import annotations

import contextlib
import types
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from .model import LoTRModel


#: The keyword of TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``), and the options of that patch.
FUSED_LM_HEAD = "fused_lm_head"
_FUSED_OPTIONS = ("temperature", "cast_lm_head_to_fp32", "outputs")
#: What "cannot adopt TRL's fused LM head" says; ``{detail}`` is why.
_NO_FUSED_LM_HEAD = (
    "TRL patches the model's forward with a fused LM head (add_fused_lm_head) that reads the model's base_model as "
    "its transformer backbone; a LoTRModel applies that patch to its base model instead, but {detail}. Train the "
    "adapter as a PEFT model: SFTTrainer(model=base_model, peft_config=LoTRPeftConfig(...)) with "
    "tensorlotr.peft.LoTRPeftConfig"
)


def is_fused_lm_head(owner: nn.Module, value: Any) -> bool:
    """True for ``owner.forward = <TRL's fused forward bound to owner>``: a bound method taking ``fused_lm_head``."""
    if not isinstance(value, types.MethodType) or value.__self__ is not owner:
        return False
    code = getattr(value.__func__, "__code__", None)
    if code is None:
        return False
    named = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    return FUSED_LM_HEAD in named


def _fused_lm_head_patch(value: types.MethodType) -> tuple[Any, dict[str, Any]]:
    """TRL's ``add_fused_lm_head`` that made the fused forward ``value``, and the options it was called with."""
    func = value.__func__
    patch = func.__globals__.get("add_fused_lm_head")
    cells = dict(zip(func.__code__.co_freevars, func.__closure__ or (), strict=True))
    options = {}
    for name in _FUSED_OPTIONS:
        with contextlib.suppress(KeyError, ValueError):  # not a variable of the patch, or an empty cell
            options[name] = cells[name].cell_contents
    if not callable(patch) or len(options) != len(_FUSED_OPTIONS):
        detail = f"this TRL's patch does not take the options {_FUSED_OPTIONS} that tensorlotr knows (TRL 1.16)"
        raise TypeError(_NO_FUSED_LM_HEAD.format(detail=detail))
    return patch, options


def adopt_fused_lm_head(lotr: LoTRModel, patched: types.MethodType) -> None:
    """Apply TRL's fused LM head to ``lotr``'s base model, where its backbone and head are, instead of to the wrapper.

    TRL's ``add_fused_lm_head(model)`` replaces ``model.forward`` by a forward that, given
    ``fused_lm_head=True``, runs ``model.base_model`` as the transformer backbone (a
    transformers model's ``base_model``) and projects through ``model.get_output_embeddings()``.
    A ``LoTRModel``'s ``base_model`` is the whole model, so the patch goes to it, with the
    same options; the LoTR model's own forward passes ``fused_lm_head`` and the labels on.
    A second patch (the reference model's, or another trainer's) must have the same options;
    the head then computes the output fields either asks for. Anything else than TRL 1.16's
    patch raises ``TypeError`` pointing to ``LoTRPeftConfig``.

    Examples
    --------
    A forward that takes ``fused_lm_head`` but was not made by TRL's patch is refused:

    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, get_lotr_model
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> lotr = get_lotr_model(BertModel(bert), LoTRConfig(rank=4, target_modules=["query"]))
    >>> def forward(self, *args, fused_lm_head=False, **kwargs): ...
    >>> patched = forward.__get__(lotr)
    >>> is_fused_lm_head(lotr, patched)
    True
    >>> adopt_fused_lm_head(lotr, patched)
    Traceback (most recent call last):
    TypeError: TRL patches the model's forward with a fused LM head (add_fused_lm_head) ...
    """
    patch, options = _fused_lm_head_patch(patched)
    adopted = lotr._fused_lm_head
    if adopted is not None:  # the reference model of the same trainer, or another trainer
        if any(adopted[k] != options[k] for k in _FUSED_OPTIONS if k != "outputs"):
            detail = f"it was patched with other options already ({adopted}, now {options})"
            raise TypeError(_NO_FUSED_LM_HEAD.format(detail=detail))
        wanted = tuple(dict.fromkeys((*adopted["outputs"], *options["outputs"])))
        if wanted == tuple(adopted["outputs"]):
            return  # the fields asked for are computed already
        options = {**options, "outputs": wanted}  # one head computing every field either asks for
    text_config = getattr(getattr(lotr.base_model, "config", None), "get_text_config", None)
    if not callable(text_config) or not callable(getattr(lotr.base_model, "get_output_embeddings", None)):
        detail = f"the base model, a {type(lotr.base_model).__name__}, is not a transformers causal LM"
        raise TypeError(_NO_FUSED_LM_HEAD.format(detail=detail))
    patch(lotr.base_model, **options)
    lotr._fused_lm_head = options


class LoTRReferenceModel(nn.Module):
    """A :class:`LoTRModel` with its adapters disabled: the base model, as a reference for DPO, sharing every weight.

    Its forward runs the LoTR model inside :meth:`LoTRModel.disable_adapter`, so it computes
    the base model (the original ``modules_to_save`` included) with no second copy in memory,
    as TRL's trainers use a ``PeftModel`` with its adapter disabled. It holds no parameters of
    its own (the LoTR model is not its submodule), and attributes it lacks (``config``,
    ``generation_config``, ``device``) are the LoTR model's. Pass it as TRL's ``ref_model``:
    ``DPOTrainer(model=lotr, ref_model=lotr.reference_model(), ...)``. TRL's fused LM head
    works through it too.

    Examples
    --------
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from tensorlotr import LoTRConfig, get_lotr_model, tucker2
    >>> bert = BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    ... )
    >>> base = BertModel(bert).eval()
    >>> x = torch.tensor([[1, 2, 3]])
    >>> expected = base(input_ids=x).last_hidden_state
    >>> lotr = get_lotr_model(base, LoTRConfig(rank=4, target_modules=["query"])).eval()
    >>> lotr.load_tucker("query", tucker2(torch.randn(2, 32, 32), rank=4))  # as if trained
    >>> reference = lotr.reference_model()
    >>> torch.equal(reference(input_ids=x).last_hidden_state, expected), list(reference.parameters())
    (True, [])
    """

    _lotr: LoTRModel

    def __init__(self, lotr: LoTRModel) -> None:
        super().__init__()
        object.__setattr__(self, "_lotr", lotr)  # not a submodule: no parameter is seen twice

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The LoTR model's forward with its adapters disabled."""
        with self._lotr.disable_adapter():
            return self._lotr(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._lotr, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "forward" and is_fused_lm_head(self, value):
            self._lotr._adopt_fused_lm_head(value)  # the base model gets the fused head; this forward passes it on
            return
        super().__setattr__(name, value)
