"""Hypothesis properties of the output-aware Tucker-2: it never does worse than the plain one, and sweeps never hurt."""

from __future__ import annotations

import numpy as np
from builders import random_lora_factors
from hypothesis import given
from hypothesis import strategies as st

from tensorlotr.core import tucker2_lowrank, tucker2_weighted, weighted_error_lowrank


@given(seed=st.integers(0, 10_000), r_out=st.integers(1, 6), r_in=st.integers(1, 6), thin=st.booleans())
def test_weighted_beats_plain_and_sweeps_never_raise_the_error(seed, r_out, r_in, thin):
    B, A, rng = random_lora_factors(seed)
    k = 4 if thin else 11
    zs = [rng.standard_normal((11, k)) * np.exp(rng.standard_normal(k)) for _ in range(len(B))]
    plain = weighted_error_lowrank(tucker2_lowrank(B, A, (r_out, r_in)), B, A, zs)
    errors = [
        weighted_error_lowrank(tucker2_weighted(B, A, zs, (r_out, r_in), damping=0.0, n_iter=n), B, A, zs)
        for n in (0, 1, 4)
    ]
    assert errors[0] <= plain + 1e-9
    assert errors[1] <= errors[0] + 1e-9 and errors[2] <= errors[1] + 1e-9
