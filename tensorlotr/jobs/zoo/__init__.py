"""The LoRA zoo: many adapters of one base compressed into one shared Tucker-2 basis per group.

Across a zoo, a group's updates form a 4-way tensor (adapter, layer, d_out, d_in). Each group
gets one ``U`` (d_out, r_out) and one ``V`` (d_in, r_in) shared by every adapter and layer, and
each adapter owns an ``r_out x r_in`` core per layer. The adapter and layer modes are never
compressed, so the decomposition is :func:`tensorlotr.tucker2_lowrank` of the list of every
adapter's LoRA factors: factored throughout, exact at full rank, with optional HOOI sweeps.
A group that an adapter lacks has no cores for it and costs nothing.

With calibration statistics the basis minimises the calibrated output error instead
(:func:`tensorlotr.core.tucker2_weighted`; every adapter's layer l sees the base model's
inputs of layer l). Fairness: by default each adapter's term is divided by its own (output)
energy, so the basis minimises the sum of the adapters' *relative* errors, and a small adapter
is not sacrificed to a large one; ``min_retention`` then guarantees each adapter a share of
its energy in every group, reweighting the adapters that fall short and, if that is not
enough, raising the group's rank (see ``docs/calibration.md`` for the measurements behind
this choice).

One module per job: ``sources`` (the adapters read as LoRA factors), ``fit`` (the shared-basis
fit), ``report`` (:class:`ZooReport`), ``compress`` (:func:`compress_zoo`), ``add``
(:func:`add_to_zoo`), ``inspect`` (:func:`inspect_zoo`) and ``heal`` (healing the adapters).
"""

from .add import add_to_zoo
from .compress import compress_zoo
from .inspect import inspect_zoo
from .report import ZooAdapterReport, ZooReport

__all__ = ["ZooAdapterReport", "ZooReport", "add_to_zoo", "compress_zoo", "inspect_zoo"]
