"""Checkpoints of the original LoTR code (github.com/daskol/lotr), read as a LoTR adapter.

The original code wraps each adapted ``nn.Linear`` at path ``M`` in a ``LoTRLinear``; a
state dict of the model (``torch.save(model.state_dict())``, or a ``Trainer`` folder) then
holds, per adapted layer:

- ``M.linear.weight`` (and ``M.linear.bias``): the frozen base layer;
- ``M.lotr.lhs`` (r, d_out) and ``M.lotr.rhs`` (d_in, r): one pair of parameters shared by
  the layers of one ``LoTR`` container, so the state dict repeats them under every layer;
- ``M.lotr.mid`` (r, r): the layer's own core.

The layer computes ``linear(x) + s * ((x rhs) mid) lhs`` with ``s = scale / r``, ``scale``
being the argument given to ``LoTRLinear`` (1 by default): ``dW = s lhs^T mid^T rhs^T``.
In LoTR's terms ``U = lhs^T`` (d_out, r), ``V = rhs`` (d_in, r) and ``G_l = mid^T``, at
scale ``s`` (``alpha = scale``), so the converted adapter computes the same products.

Layers whose ``lhs`` and ``rhs`` are equal form one group; a layer whose factors no other
layer shares is refused (the checkpoint is then not a LoTR adapter), and so is a checkpoint
whose frozen layers differ from the base model's weights (trained on another base). Tensors
outside the adapted layers that differ from the base's (a trained classifier head) become
``modules_to_save``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter.config import LoTRConfig
from ..adapter.groups import module_order
from ..adapter.layout import GroupLayout, LoTRAdapterFiles, core_key, factor_key, saved_key
from .checkpoint import BIN_NAME, SAFE_INDEX, SAFE_NAME, WeightSource, open_weight_file, open_weights

#: The tensors of one adapted layer of the original code, by the suffix of their key.
FACTOR_SUFFIXES = (".lotr.lhs", ".lotr.mid", ".lotr.rhs")
#: File suffixes of checkpoint files (a folder holds ``model.safetensors`` or ``pytorch_model.bin``).
CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")


def _source(checkpoint: str | os.PathLike[str] | dict[str, torch.Tensor]) -> WeightSource:
    if isinstance(checkpoint, dict):
        return open_weights(checkpoint, "checkpoint")
    return open_weight_file(checkpoint, "checkpoint")


def is_original_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True for a file or model folder whose state dict holds the original code's ``….lotr.lhs`` tensors.

    A PEFT or LoTR adapter folder is not one. Only the tensor names are read (a ``.bin``
    file is memory-mapped).

    Examples
    --------
    >>> import torch
    >>> state = {"q.linear.weight": torch.zeros(4, 3), "q.lotr.lhs": torch.zeros(2, 4),
    ...          "q.lotr.mid": torch.zeros(2, 2), "q.lotr.rhs": torch.zeros(3, 2)}
    >>> torch.save(state, "original.pt")
    >>> is_original_checkpoint("original.pt"), is_original_checkpoint("missing.pt")
    (True, False)
    """
    file = Path(path)
    if file.is_dir():
        if (file / "adapter_config.json").exists() or (file / "lotr_config.json").exists():
            return False
        if not any((file / name).is_file() for name in (SAFE_NAME, SAFE_INDEX, BIN_NAME)):
            return False
    elif not (file.is_file() and file.suffix in CHECKPOINT_SUFFIXES):
        return False
    try:
        keys = _source(file).shapes
    except (OSError, ValueError):
        return False
    return any(k.endswith(FACTOR_SUFFIXES) for k in keys)


def _check_factor(source: WeightSource, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if source.shapes[key] != shape:
        raise ValueError(f"{source.name}: tensor {key!r} has shape {source.shapes[key]}, expected {shape}")
    tensor = source.get(key)
    if not tensor.is_floating_point():
        raise ValueError(f"{source.name}: tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{source.name}: tensor {key!r} holds NaN or Inf values")
    return tensor


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, ``b`` rounded to ``a``'s dtype (a checkpoint saved in half precision)."""
    return a.shape == b.shape and torch.equal(a, b.to(a.dtype))


def _group_name(modules: list[str], taken: set[str]) -> str:
    """``query_value`` for the modules ``….query`` and ``….value``; numbered when taken."""
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    name = "_".join(leaves)[:64] or "group"
    candidate, k = name, 1
    while candidate in taken:
        candidate, k = f"{name}_{k}", k + 1
    return candidate


def read_original(
    checkpoint: str | os.PathLike[str] | dict[str, torch.Tensor],
    base_model: str | os.PathLike[str] | nn.Module | dict[str, torch.Tensor],
    *,
    scale: float = 1.0,
) -> LoTRAdapterFiles:
    """A checkpoint of the original LoTR code as a LoTR adapter, exactly; errors name the key at fault.

    Parameters
    ----------
    checkpoint : path or dict
        The fine-tuned model's state dict: a ``.bin`` / ``.pt`` / ``.pth`` (``torch.save``;
        only tensors are unpickled) or ``.safetensors`` file, a model folder, or the dict.
    base_model : path, nn.Module or dict
        The base model the checkpoint was trained from (a folder, the module or its state dict).
    scale : float
        The ``scale`` the original ``LoTRLinear`` layers were built with (their default, 1);
        each layer adds ``scale / r`` times its product.

    Returns
    -------
    LoTRAdapterFiles
        One group per set of shared factors: ``U = lhs^T`` (d_out, r), ``V = rhs`` (d_in, r),
        cores ``mid^T`` (r, r), scale ``scale / r``; changed tensors outside the adapted
        layers as ``modules_to_save``. Tensors keep the checkpoint's dtype.

    Examples
    --------
    Two linear layers (3 -> 4) sharing ``lhs`` (2, 4) and ``rhs`` (3, 2), each with its ``mid``:

    >>> import torch
    >>> from torch import nn
    >>> base = nn.ModuleDict({"a": nn.Linear(3, 4), "b": nn.Linear(3, 4)})
    >>> lhs, rhs = torch.randn(2, 4), torch.randn(3, 2)
    >>> state = {}
    >>> for name in ("a", "b"):
    ...     state.update({f"{name}.linear.weight": base[name].weight.detach(), f"{name}.linear.bias":
    ...                   base[name].bias.detach(), f"{name}.lotr.lhs": lhs, f"{name}.lotr.mid": torch.randn(2, 2),
    ...                   f"{name}.lotr.rhs": rhs})
    >>> files = read_original(state, base, scale=2.0)
    >>> layout = files.groups["a_b"]
    >>> layout.modules, layout.rank, layout.scale
    (['a', 'b'], (2, 2), 1.0)
    >>> torch.equal(files.factor("a_b", "out_factor"), lhs.T), torch.equal(files.core("b"), state["b.lotr.mid"].T)
    (True, True)
    """
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number (the original LoTRLinear's scale), got {scale!r}")
    ckpt = _source(checkpoint)
    base = open_weights(base_model, "base")
    modules = sorted({k[: -len(s)] for k in ckpt.shapes for s in FACTOR_SUFFIXES if k.endswith(s)}, key=module_order)
    if not modules:
        raise ValueError(
            f"{ckpt.name} holds no tensors of the original LoTR code (keys ending in {', '.join(FACTOR_SUFFIXES)})"
        )
    adapted_keys: set[str] = set()
    groups: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []
    cores: dict[str, torch.Tensor] = {}
    for module in modules:
        keys = {s: f"{module}{s}" for s in (*FACTOR_SUFFIXES, ".linear.weight", ".linear.bias")}
        missing = [keys[s] for s in (*FACTOR_SUFFIXES, ".linear.weight") if keys[s] not in ckpt.shapes]
        if missing:
            raise ValueError(f"{ckpt.name}: layer {module!r} lacks {missing[0]!r}; is it an original LoTRLinear?")
        adapted_keys.update(k for k in keys.values() if k in ckpt.shapes)
        if f"{module}.weight" not in base.shapes:
            raise ValueError(f"{ckpt.name} adapts {module!r}, which the base model {base.name} lacks ({module}.weight)")
        if module in base.conv1d_modules:
            raise ValueError(f"{module!r} is a GPT-2 Conv1D in {base.name}; the original code adapts nn.Linear only")
        weight_shape = base.shapes[f"{module}.weight"]
        if len(weight_shape) != 2:
            raise ValueError(f"{module!r} of {base.name} is not a linear layer: its weight has shape {weight_shape}")
        d_out, d_in = weight_shape
        mid_shape = ckpt.shapes[keys[".lotr.mid"]]
        r = mid_shape[0] if mid_shape else 0
        lhs = _check_factor(ckpt, keys[".lotr.lhs"], (r, d_out))
        mid = _check_factor(ckpt, keys[".lotr.mid"], (r, r))
        rhs = _check_factor(ckpt, keys[".lotr.rhs"], (d_in, r))
        for suffix, base_key in ((".linear.weight", f"{module}.weight"), (".linear.bias", f"{module}.bias")):
            if keys[suffix] not in ckpt.shapes:
                continue
            if base_key not in base.shapes or not _same(ckpt.get(keys[suffix]), base.get(base_key)):
                raise ValueError(
                    f"{ckpt.name}: the frozen {keys[suffix]!r} differs from {base_key!r} of the base model "
                    f"{base.name}; was the checkpoint trained from another base?"
                )
        cores[module] = mid.T.contiguous()
        for group_lhs, group_rhs, members in groups:
            if _same(group_lhs, lhs) and _same(group_rhs, rhs):
                members.append(module)
                break
        else:
            groups.append((lhs, rhs, [module]))
    alone = [members[0] for _, _, members in groups if len(members) == 1]
    if alone:
        raise ValueError(
            f"{ckpt.name}: the factors lotr.lhs / lotr.rhs of {alone[:3]} are shared with no other layer; "
            "LoTR shares them across layers, so this is not a LoTR adapter of the original code"
        )
    layouts: dict[str, GroupLayout] = {}
    tensors: dict[str, torch.Tensor] = {}
    for lhs, rhs, members in groups:
        name = _group_name(members, set(layouts))
        r = int(lhs.shape[0])
        layouts[name] = GroupLayout(members, (int(lhs.shape[1]), int(rhs.shape[0])), (r, r), float(scale) / r)
        tensors[factor_key(name, "out_factor")] = lhs.T.contiguous()
        tensors[factor_key(name, "in_factor")] = rhs.contiguous()
        tensors.update({core_key(m): cores[m] for m in members})
    saved = _changed(ckpt, base, adapted_keys)
    tensors.update({saved_key(k): t for k, t in saved.items()})
    saved_modules = sorted({k.rsplit(".", 1)[0] for k in saved})
    config = LoTRConfig(
        rank=next(iter(layouts.values())).rank,
        alpha=float(scale),
        target_modules=sorted(modules, key=module_order),
        groups={name: list(g.modules) for name, g in layouts.items()},
        modules_to_save=saved_modules or None,
        rank_pattern={name: g.rank for name, g in layouts.items()},
        alpha_pattern={name: float(scale) for name in layouts},
    )
    info: dict[str, Any] = {
        "name_or_path": str(base_model) if isinstance(base_model, (str, os.PathLike)) else None,
        "model_type": base.config.get("model_type"),
        "class": type(base_model).__name__
        if isinstance(base_model, nn.Module)
        else (base.config.get("architectures") or [None])[0],
        "source": "original LoTR checkpoint (github.com/daskol/lotr)",
    }
    return LoTRAdapterFiles(config.to_dict(), layouts, tensors, info)


def _changed(ckpt: WeightSource, base: WeightSource, adapted: set[str]) -> dict[str, torch.Tensor]:
    """Parameters of the modules that training changed outside the adapted layers, by base parameter path.

    A changed tensor brings every tensor of its module along (a head's weight and bias).
    Keys the base lacks are refused, but for buffers (not floating point) and tied copies.
    """
    changed: set[str] = set()
    for key in ckpt.shapes:
        if key in adapted:
            continue
        tensor = ckpt.get(key)
        if key not in base.shapes:
            tied = any(
                base.shapes[k] == ckpt.shapes[key] and _same(tensor, base.get(k)) for k in base.shapes
            )  # lm_head.weight: the embeddings, which the base's file stores once
            if not tensor.is_floating_point() or tied:
                continue
            raise ValueError(
                f"{ckpt.name}: tensor {key!r} is in neither an adapted layer nor the base model {base.name}"
            )
        if base.shapes[key] != ckpt.shapes[key]:
            raise ValueError(
                f"{ckpt.name}: tensor {key!r} has shape {ckpt.shapes[key]}, but the base model's is "
                f"{base.shapes[key]} (load the base with the checkpoint's number of labels)"
            )
        if not _same(tensor, base.get(key)):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{ckpt.name}: tensor {key!r} holds NaN or Inf values")
            changed.add(key.rsplit(".", 1)[0])
    return {
        k: ckpt.get(k).clone()
        for k in ckpt.shapes
        if k not in adapted and k in base.shapes and k.rsplit(".", 1)[0] in changed
    }
