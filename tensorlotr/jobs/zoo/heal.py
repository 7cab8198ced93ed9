"""Healing a zoo's adapters: each adapter's cores distilled from its own LoRA, the shared factors kept.

After a calibrated :func:`tensorlotr.zoo.compress_zoo` with ``heal_steps``, every adapter of
the zoo is healed on its own (:func:`tensorlotr.heal.heal_adapter`, cores only: the factors
are every adapter's) against the LoRA it came from, on the calibration inputs.
"""

from __future__ import annotations

from typing import Any

from ...adapter.layout import ZooFiles, zoo_core_key
from ...progress import Progress
from ..calibration import Calibration, error_sums
from .report import PairErrors
from .sources import Source


def heal_zoo(
    zoo: ZooFiles,
    sources: dict[str, Source],
    cal: Calibration,
    errors: PairErrors,
    progress: Progress,
    names: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Heal each adapter's cores against its own LoRA, in place in ``zoo``; add the healed errors to ``errors``.

    ``names`` heals only those adapters (default: every one).

    ``cal`` holds the base model, the inputs, the statistics (collected by the compression)
    and the heal's settings; ``errors[(adapter, group)]["healed"]`` is set for every pair.

    Returns
    -------
    dict of str to dict
        Each adapter's heal report (:class:`tensorlotr.heal.HealReport` as a dict).

    Examples
    --------
    ``lora-a/`` and ``lora-b/`` hold rank-4 LoRAs on ``q_proj`` and ``v_proj`` of a 2-layer
    Llama of hidden size 32; four batches of 2 sequences of 8 tokens are the calibration inputs:

    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from tensorlotr.progress import no_progress
    >>> from tensorlotr.jobs.zoo.fit import Objective, fit_zoo
    >>> from tensorlotr.jobs.zoo.sources import check_same_base, read_source
    >>> base = LlamaForCausalLM(LlamaConfig(
    ...     vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    ...     num_key_value_heads=4, max_position_embeddings=32))
    >>> inputs = [{"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8)} for _ in range(4)]
    >>> cal = Calibration(inputs=inputs, base_model=base, heal_steps=5)
    >>> sources = {"a": read_source("lora-a"), "b": read_source("lora-b")}
    >>> shapes = check_same_base(sources)
    >>> objective = Objective(cal.statistics(sorted(shapes)), cal)
    >>> zoo, errors, _ = fit_zoo(sources, shapes, (4, 4), None, 0, "by_name", no_progress, objective)
    >>> reports = heal_zoo(zoo, sources, cal, errors, no_progress)
    >>> sorted(reports), reports["a"]["steps"], sorted(errors[("a", "q_proj")])
    (['a', 'b'], 5, ['compressed', 'healed'])
    """
    from ...nn.heal import LoRATeacher, heal_adapter  # the torch bindings, only when healing

    assert cal.base_model is not None and cal.inputs is not None and cal.stats is not None
    reports = {}
    for name, source in sources.items():
        if names is not None and name not in names:
            continue
        files = zoo.adapter(name)
        modules = [m for layout in files.groups.values() for m in layout.modules]
        bs, as_, scales = source.load(modules)
        updates = {m: (b.float(), a.float(), s) for m, b, a, s in zip(modules, bs, as_, scales, strict=True)}
        teacher = LoRATeacher(updates, source.load_modules_to_save())
        healed, report = heal_adapter(
            cal.base_model, files, teacher, cal.inputs, steps=cal.heal_steps, lr=cal.heal_lr,
            held_out=cal.held_out, progress=progress,
        )  # fmt: skip
        reports[name] = report.to_dict()
        for group, layout in healed.groups.items():
            for module in layout.modules:
                zoo.tensors[zoo_core_key(name, module)] = healed.core(module).float().contiguous()
            b, a, s = source.load(layout.modules)
            tucker = healed.tucker(group, layout.modules)
            errors[(name, group)]["healed"] = error_sums(tucker, b, a, s, cal.stats.factors(layout.modules))
    return reports
