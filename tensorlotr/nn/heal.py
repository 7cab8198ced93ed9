"""Heal a compressed adapter: distil the original LoRA's outputs into its cores, without labels.

Compression keeps each layer's update close to the LoRA's, layer by layer; the errors of the
layers add up through the network. :func:`heal` trains the compressed adapter's cores (and,
as an option, its factors) so that the model's last hidden states on the calibration inputs
match the teacher's (the base model with the original LoRA), through the LoTR training path:
the adapter is attached with :meth:`tensorlotr.LoTRModel.from_adapter_files` and trained with
Adam. The loss is the relative output error,

    e^2 = sum ||h_student - h_teacher||^2 / sum ||h_teacher - h_base||^2

over the inputs' real (unpadded) tokens: the share of the adapter's effect on the outputs
that is lost. Part of the inputs is held out of training to measure it before and after.

:func:`heal_adapter` is what the jobs call: it computes the teacher's outputs with
:class:`LoRATeacher` (forward hooks that add ``s B (A x)`` to each module's output on the
bare base model), heals, and returns the healed adapter, leaving the base model as it was.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapter import LoTRAdapterFiles
from ..progress import Progress, no_progress
from ..report import Result
from .calibration import resolve_modules
from .model import LoTRModel

Batch = Mapping[str, Any]


@dataclass(kw_only=True)
class HealReport(Result):
    """What :func:`heal` did: steps, time, and the relative output error before and after.

    ``error_before`` / ``error_after`` are measured on the held-out inputs (on the training
    inputs when none are held out); the held-out error is measured every fifth of the steps
    and the adapter ends in its best state, after ``kept_step`` steps (0: the heal did not
    help, and the adapter is as it was). ``loss_first`` / ``loss_last`` are the training loss
    (``e^2``) over the first and last tenth of the steps.
    """

    steps: int
    lr: float
    train_factors: bool
    train_batches: int
    held_out_batches: int
    error_before: float
    error_after: float
    kept_step: int
    loss_first: float
    loss_last: float
    seconds: float

    def text(self) -> str:
        trained = "cores and factors" if self.train_factors else "cores"
        return (
            f"heal: {self.steps} steps on {trained} in {self.seconds:.1f} s (kept the state after {self.kept_step}); "
            f"relative output error on {self.held_out_batches} held-out batches "
            f"{self.error_before:.4f} -> {self.error_after:.4f}"
        )


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _on(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def last_hidden(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's last hidden states at the batch's real tokens: (tokens, hidden), float32.

    Padding positions (``attention_mask == 0``) are left out.
    """
    out = model(**_on(batch, _device(model)), output_hidden_states=True)
    hidden: torch.Tensor = out.hidden_states[-1] if getattr(out, "hidden_states", None) is not None else out[0]
    mask = batch.get("attention_mask")
    if mask is not None and tuple(mask.shape) == tuple(hidden.shape[:-1]):
        hidden = hidden[mask.to(device=hidden.device, dtype=torch.bool)]
    return hidden.reshape(-1, hidden.shape[-1]).float()


@torch.no_grad()
def outputs_of(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """:func:`last_hidden` of every batch, in eval mode, without gradients."""
    model.eval()
    return [last_hidden(model, batch) for batch in batches]


class LoRATeacher:
    """The original LoRA as a teacher: ``dW_l x = s_l B_l (A_l x)`` added by forward hooks on the base model.

    Parameters
    ----------
    updates : dict of str to (B, A, s)
        Per module path: ``B`` (d_out, r), ``A`` (r, d_in), scale ``s``.
    saved : dict of str to tensor
        The LoRA's ``modules_to_save`` tensors by parameter path, put in place while it runs.
    """

    def __init__(
        self, updates: dict[str, tuple[torch.Tensor, torch.Tensor, float]], saved: dict[str, torch.Tensor]
    ) -> None:
        self.updates = updates
        self.saved = saved

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[nn.Module]:
        """``model`` with the LoRA's updates and saved tensors in place inside the block."""
        modules = resolve_modules(model, self.updates)
        handles = []
        originals: dict[str, torch.Tensor] = {}
        try:
            for name, module in modules.items():
                b, a, s = self.updates[name]
                handles.append(module.register_forward_hook(_adds(b, a, s)))
            with torch.no_grad():
                for key, value in self.saved.items():
                    tensor = _tensor_at(model, key)
                    originals[key] = tensor.detach().clone()
                    tensor.copy_(value)
            yield model
        finally:
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for key, value in originals.items():
                    _tensor_at(model, key).copy_(value)

    def outputs(self, model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
        """:func:`outputs_of` the base ``model`` with this LoRA."""
        with self.applied(model):
            return outputs_of(model, batches)


def _adds(
    b: torch.Tensor, a: torch.Tensor, s: float
) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
    """A forward hook adding ``s B (A x)`` to a module's output."""

    def hook(_module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        added: torch.Tensor = output + s * ((x @ a.to(x).T) @ b.to(x).T)
        return added

    return hook


def _tensor_at(model: nn.Module, key: str) -> torch.Tensor:
    owner, _, attr = key.rpartition(".")
    tensor = getattr(model.get_submodule(owner), attr, None)
    if not torch.is_tensor(tensor):
        raise ValueError(f"the base model has no tensor {key!r} (a modules_to_save tensor of the adapter)")
    return tensor


def _relative_error(
    model: nn.Module, batches: Sequence[Batch], targets: Sequence[torch.Tensor], norm_sq: float
) -> float:
    """``sqrt(sum ||h - t||^2 / norm_sq)`` of ``model``'s last hidden states ``h`` against ``targets``."""
    with torch.no_grad():
        err = sum(float((last_hidden(model, b) - t).square().sum()) for b, t in zip(batches, targets, strict=True))
    return math.sqrt(err / norm_sq) if norm_sq > 0 else 0.0


def heal(
    model: LoTRModel,
    inputs: Sequence[Batch],
    *,
    teacher: nn.Module | Sequence[torch.Tensor],
    steps: int = 100,
    lr: float = 1e-3,
    train_factors: bool = False,
    held_out: float = 0.125,
    progress: Progress | None = None,
) -> HealReport:
    """Train ``model``'s adapter cores (and factors) to reproduce ``teacher``'s last hidden states.

    The held-out error is measured every fifth of the steps and the adapter is left in the
    state where it was lowest, so a heal never makes the held-out error worse.

    Parameters
    ----------
    model : LoTRModel
        The base model with the compressed adapter attached. Its base is frozen; only the
        cores (with ``train_factors`` the factors too) train, in eval mode (no dropout).
        ``model.disable_adapter()`` gives the base outputs that the error is relative to.
    inputs : sequence of dict
        Tokenized batches (the calibration inputs).
    teacher : nn.Module or sequence of tensors
        The model whose outputs to match (the base with the original LoRA), or its
        :func:`last_hidden` of each batch of ``inputs``, in order.
    steps : int
        Optimizer steps, one batch each, cycling over the training batches.
    lr : float
        Adam's learning rate.
    train_factors : bool
        Also train the shared factors ``U`` and ``V``.
    held_out : float in [0, 1)
        The share of batches (the last ones; at least one when there are two or more) kept
        out of training to measure the error on.

    Returns
    -------
    HealReport
    """
    if steps < 0 or not lr > 0 or not 0 <= held_out < 1:
        raise ValueError(f"heal needs steps >= 0, lr > 0 and 0 <= held_out < 1; got {steps}, {lr}, {held_out}")
    batches = list(inputs)
    if not batches:
        raise ValueError("heal needs at least one batch of inputs")
    start = time.perf_counter()
    targets = outputs_of(teacher, batches) if isinstance(teacher, nn.Module) else list(teacher)
    if len(targets) != len(batches):
        raise ValueError(f"teacher gives {len(targets)} outputs for {len(batches)} batches")
    with model.disable_adapter():
        base = outputs_of(model, batches)
    cut = len(batches) - (max(1, round(held_out * len(batches))) if held_out > 0 and len(batches) > 1 else 0)
    train = list(range(cut))
    held = list(range(cut, len(batches))) or train
    effect = [float((t - b).square().sum()) for t, b in zip(targets, base, strict=True)]
    norm_train = sum(effect[i] for i in train) / len(train)
    norm_held = sum(effect[i] for i in held)

    for param in model.parameters():
        param.requires_grad_(False)
    params = [layer.lotr_core for _, layer in model.lotr_layers()]
    if train_factors:
        params += list(model.lotr_factors.parameters())
    for param in params:
        param.requires_grad_(True)
    model.eval()
    held_batches, held_targets = [batches[i] for i in held], [targets[i] for i in held]
    before = _relative_error(model, held_batches, held_targets, norm_held)
    best = (before, 0, [p.detach().clone() for p in params])
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    checks = max(1, steps // 5)  # the held-out error is measured five times; the best state is kept
    for step in (progress or no_progress)(range(steps), "healing", steps):
        i = train[step % len(train)]
        loss = (last_hidden(model, batches[i]) - targets[i]).square().sum() / max(norm_train, 1e-30)
        optimizer.zero_grad()
        torch.autograd.backward(loss)
        optimizer.step()
        losses.append(float(loss.detach()))
        if (step + 1) % checks == 0 or step + 1 == steps:
            error = _relative_error(model, held_batches, held_targets, norm_held)
            if error < best[0]:
                best = (error, step + 1, [p.detach().clone() for p in params])
    with torch.no_grad():
        for param, value in zip(params, best[2], strict=True):
            param.copy_(value)
            param.requires_grad_(False)
    after = best[0]
    window = max(1, len(losses) // 10)
    return HealReport(
        steps=steps,
        lr=lr,
        train_factors=train_factors,
        train_batches=len(train),
        held_out_batches=len(held) if held is not train else 0,
        error_before=before,
        error_after=after,
        kept_step=best[1],
        loss_first=sum(losses[:window]) / window if losses else float("nan"),
        loss_last=sum(losses[-window:]) / window if losses else float("nan"),
        seconds=time.perf_counter() - start,
    )


def heal_adapter(
    base_model: nn.Module,
    files: LoTRAdapterFiles,
    teacher: LoRATeacher,
    inputs: Sequence[Batch],
    *,
    steps: int,
    lr: float = 1e-3,
    train_factors: bool = False,
    held_out: float = 0.125,
    progress: Progress | None = None,
) -> tuple[LoTRAdapterFiles, HealReport]:
    """Heal the adapter ``files`` on ``base_model`` against ``teacher``; the base model is left as it was.

    The teacher's outputs are computed on the bare base model, then the adapter is attached,
    healed with :func:`heal`, read back and removed; the base model's tensors that the adapter
    or the teacher replaced, and its parameters' ``requires_grad``, are restored.

    Returns
    -------
    (LoTRAdapterFiles, HealReport)
        The healed adapter (float32 tensors; factors unchanged unless ``train_factors``) and the report.
    """
    batches = list(inputs)
    targets = teacher.outputs(base_model, batches)
    flags = {name: p.requires_grad for name, p in base_model.named_parameters()}
    with torch.no_grad():
        kept = {key: _tensor_at(base_model, key).detach().clone() for key in files.modules_to_save}
    student = LoTRModel.from_adapter_files(base_model, files, is_trainable=True, source="the compressed adapter")
    try:
        report = heal(
            student, batches, teacher=targets, steps=steps, lr=lr, train_factors=train_factors, held_out=held_out,
            progress=progress,
        )  # fmt: skip
        healed = student.adapter_files()
        tensors = {k: v.detach().to(torch.float32).clone() for k, v in healed.tensors.items()}
    finally:
        student.unload()
        with torch.no_grad():
            for key, value in kept.items():
                _tensor_at(base_model, key).copy_(value)
        for name, param in base_model.named_parameters():
            param.requires_grad_(flags.get(name, param.requires_grad))
    tensors.update({k: v for k, v in files.tensors.items() if k not in tensors})
    return LoTRAdapterFiles(files.config, dict(files.groups), tensors, dict(files.base_model)), report
