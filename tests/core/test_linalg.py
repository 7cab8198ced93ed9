"""LAPACK steps of the core (core/linalg.py): the left singular vectors of wide matrices."""

from __future__ import annotations

import numpy as np


def test_wide_matrices_take_the_gram_route_with_the_same_leading_vectors():
    from tensorlotr.core.linalg import WIDE, WIDE_MIN_ROWS, left_svd

    rng = np.random.default_rng(3)
    rows = WIDE_MIN_ROWS
    x = rng.standard_normal((rows, WIDE * rows)) * np.geomspace(1, 1e-3, WIDE * rows)
    u, s = left_svd(x)
    u_ref, s_ref, _ = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(s[:20], s_ref[:20], rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(u[:, :20] * u_ref[:, :20], axis=0)), 1.0, atol=1e-8)
