"""The streaming Tucker-2 (``tensorlotr.core.tucker2_streaming``) on in-memory stacks, numpy and torch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
import torch

import tensorlotr as tlr
from tensorlotr.core import LayerStack, tucker2_streaming


class InMemory:
    """A :class:`LayerStack` over a held stack (L, d_out, d_in), read in row blocks of ``rows``."""

    def __init__(self, stack: Any, rows: int = 5) -> None:
        self.stack, self.rows, self.dtype, self.passes = stack, rows, stack.dtype, 0

    def __len__(self) -> int:
        return int(self.stack.shape[0])

    def layers(self, progress: Any, desc: str) -> Iterable[tuple[int, Any]]:
        self.passes += 1
        yield from enumerate(self.stack)

    def layer_blocks(self, progress: Any, desc: str) -> Iterable[tuple[int, Callable[[], Iterable[tuple[int, Any]]]]]:
        self.passes += 1
        for i, layer in enumerate(self.stack):
            yield i, (lambda layer=layer: [(s, layer[s : s + self.rows]) for s in range(0, layer.shape[0], self.rows)])

    def check_finite(self, i: int, norm_sq: float) -> float:
        if not np.isfinite(norm_sq):
            raise ValueError(f"layer {i} holds NaN or Inf values")
        return norm_sq


def planted(n_layers=6, d_out=40, d_in=30, rank=(4, 3), noise=1e-3, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((d_out, rank[0])))[0]
    v = np.linalg.qr(rng.standard_normal((d_in, rank[1])))[0]
    cores = rng.standard_normal((n_layers, *rank))
    return np.einsum("mo,loi,ni->lmn", u, cores, v) + noise * rng.standard_normal((n_layers, d_out, d_in))


def as_backend(x: np.ndarray, backend: str) -> Any:
    return torch.from_numpy(x) if backend == "torch" else x


def test_in_memory_stack_is_a_layer_stack():
    stack: LayerStack = InMemory(planted())
    assert len(stack) == 6


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_gram_route_equals_dense_hosvd(backend):
    x = planted()
    stack = InMemory(as_backend(x, backend))
    tucker, norm_sq, route = tucker2_streaming(stack, (40, 30), (5, 4), name="g")
    assert route == "exact (Gram)" and stack.passes == 2
    assert abs(norm_sq - np.sum(x**2)) < 1e-9 * np.sum(x**2)
    dense = tlr.tucker2(x, (5, 4))
    assert abs(tlr.relative_error(tucker, as_backend(x, backend)) - tlr.relative_error(dense, x)) < 1e-9


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("n_power", [0, 1, 2])
def test_randomized_route_recovers_planted_stack(backend, n_power):
    x = planted()
    stack = InMemory(as_backend(x, backend))
    tucker, norm_sq, route = tucker2_streaming(stack, (40, 30), (4, 3), gram_max_dim=8, n_power=n_power, oversample=4)
    assert route.startswith("randomized") and stack.passes == 2 + n_power
    assert tucker.rank == (4, 3) and isinstance(tucker.core, type(stack.stack))
    for factor in (tucker.out_factor, tucker.in_factor):
        f = np.asarray(factor)
        assert np.abs(f.T @ f - np.eye(f.shape[1])).max() < 1e-10
    error = tlr.relative_error(tucker, as_backend(x, backend))
    slack = 1.01 if n_power else 2.0  # without a power pass the sketch keeps some noise
    assert error < slack * tlr.relative_error(tlr.tucker2(x, (4, 3)), x)
    # the error from the norms is exact for what was computed
    kept_sq = float(np.sum(np.asarray(tucker.core) ** 2))
    assert abs(np.sqrt((norm_sq - kept_sq) / norm_sq) - error) < 1e-6


def test_randomized_route_energy_and_seed():
    x = planted(noise=1e-6)
    first, _, _ = tucker2_streaming(InMemory(torch.from_numpy(x)), (40, 30), energy=0.9999, gram_max_dim=8, max_rank=8)
    again, _, _ = tucker2_streaming(InMemory(torch.from_numpy(x)), (40, 30), energy=0.9999, gram_max_dim=8, max_rank=8)
    assert first.rank == (4, 3)
    assert torch.equal(first.core, again.core)


def test_non_finite_layer_is_named():
    x = planted()
    x[2, 1, 1] = np.nan
    for route in ({}, {"gram_max_dim": 8}):
        with pytest.raises(ValueError, match="layer 2"):
            tucker2_streaming(InMemory(x), (40, 30), (2, 2), **route)
