"""Calibration hooks: the second moment of each target module's inputs, collected by ``calibrate``."""

from __future__ import annotations

import pytest
import torch
from builders import tiny_bert, token_batches

from tensorlotr.nn.calibration import calibrate


def test_calibrate_collects_the_input_second_moment_without_padding():
    model, batches = tiny_bert(0), token_batches(3, padded=True)
    seen: list[torch.Tensor] = []
    query = model.bert.encoder.layer[1].attention.self.query
    handle = query.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach()))
    names = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(3) for p in ("query", "value")]
    stats = calibrate(model, batches, names)
    handle.remove()
    rows = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches, strict=True)]).double()
    expected = rows.T @ rows / rows.shape[0]
    moment = stats.modules[names[2]].second_moment()
    torch.testing.assert_close(moment, expected, rtol=1e-5, atol=1e-6)
    assert stats.samples == 12 and stats.tokens == rows.shape[0] == 3 * 36 - 3 * 3
    torch.testing.assert_close(stats.modules[names[3]].second_moment(), moment)  # value reads the same input
    z = stats.factor(names[2])
    torch.testing.assert_close(z @ z.T, expected, rtol=1e-5, atol=1e-6)
    assert calibrate(model, batches, names, samples=5).samples == 5
    sketched = calibrate(model, batches, names[2:3], max_dense_dim=16, sketch_rank=6).modules[names[2]]
    gap = torch.linalg.eigvalsh(expected - sketched.second_moment())
    tail = torch.linalg.eigvalsh(expected).flip(0)[3:].sum()  # ||X - X_3||_F^2 / n
    assert sketched.gram is None and gap.min() > -1e-9 and gap.max() <= tail / (6 - 3) + 1e-9


def test_calibrate_refuses_unknown_modules_and_empty_inputs():
    with pytest.raises(ValueError, match=r"no module 'model\.layers\.0\.q_proj'"):
        calibrate(tiny_bert(0), token_batches(1, padded=True), ["model.layers.0.q_proj"])
    with pytest.raises(ValueError, match="no batches"):
        calibrate(tiny_bert(0), [], ["bert.encoder.layer.0.attention.self.query"])
