"""The contraction planner (nn/layer.py's plans): opt_einsum's order run as matmuls, planned once, compiled as matmuls.

The compiled test captures graphs with a recording backend on a small plain module, where dynamo
traces in about a second.
"""

from __future__ import annotations

import operator

import opt_einsum
import pytest
import torch
from builders import assert_same, inputs, loss_and_grads, randomise_cores, tiny_llama
from torch import nn

import tensorlotr as tlr
from tensorlotr.nn.layer import ADAPTER_FORWARD
from tensorlotr.nn.planner import execute, plan_batched, plan_path


@pytest.mark.parametrize("rows", [1, 3, 16, 100, 1000])
def test_batched_plan_runs_opt_einsums_order_and_equals_einsum(rows):
    generator = torch.Generator().manual_seed(rows)
    shapes = ((48, 6), (6, 4), (40, 4), (rows, 40))
    operands = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    plan = plan_batched(ADAPTER_FORWARD, shapes, (3, 0))
    path = plan.path(rows)
    bucket = 1 << (rows - 1).bit_length()  # the power of two at or above rows
    assert path == plan_path(ADAPTER_FORWARD, (*shapes[:3], (bucket, 40)))
    expected = torch.einsum(ADAPTER_FORWARD, *operands)
    torch.testing.assert_close(execute(path, operands), expected, rtol=1e-12, atol=1e-12)
    assert all(step.gemm is not None for step in path)  # every step is one matrix product


def test_batched_plan_switches_order_with_the_row_count():
    plan = plan_batched(ADAPTER_FORWARD, ((384, 8), (8, 8), (384, 8), (1, 384)), (3, 0))
    assert len(plan.paths) == len(plan.bounds) + 1 == 3
    decode, prefill = plan.path(1), plan.path(4096)
    assert [s.equation for s in decode] == ["bn,ni->bi", "bi,oi->bo", "bo,mo->bm"]  # one token: x V, then G, then U
    assert [s.equation for s in prefill] == ["oi,mo->im", "bn,ni->bi", "bi,im->bm"]  # U G, x V, one (N, r) x (r, d)
    assert not any(s.gemm[3] for s in decode)
    assert prefill[1].gemm[3]  # the tall, narrow x V (4096 x 8) runs transposed


def test_steps_that_are_not_matrix_products_run_as_einsum():
    shapes = ((12, 3), (5, 3, 2), (10, 2))  # U, a stack of cores, V: dW_l = U G_l V^T
    path = plan_path("mo,loi,ni->lmn", shapes)
    assert any(step.gemm is None for step in path)
    operands = [torch.randn(s, dtype=torch.float64) for s in shapes]
    torch.testing.assert_close(execute(path, operands), torch.einsum("mo,loi,ni->lmn", *operands))


def test_new_batch_sizes_do_not_plan_again(monkeypatch):
    lotr = tlr.get_lotr_model(tiny_llama(), tlr.LoTRConfig(rank=4, target_modules=["q_proj", "v_proj"]))

    def refuse(*args, **kwargs):
        raise AssertionError("opt_einsum planned inside a forward")

    monkeypatch.setattr(opt_einsum, "contract_path", refuse)
    monkeypatch.setattr(opt_einsum, "contract_expression", refuse)
    with torch.no_grad():
        for batch, length in [(1, 1), (2, 7), (3, 11), (4, 13), (1, 29)]:
            lotr(**inputs(batch=batch, length=length))


# --- compiled: one graph per order, no planning inside ---------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.query = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.query(x) * torch.sigmoid(self.value(x))


class Stack(nn.Module):
    def __init__(self, width: int = 24, depth: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Block(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_graphs_hold_plain_matmuls_no_planning_and_follow_the_row_count(monkeypatch):
    lotr = tlr.get_lotr_model(
        Stack(), tlr.LoTRConfig(rank=3, target_modules=["query", "value"], groups="shared", init="normal")
    )
    randomise_cores(lotr)
    plan = plan_batched(ADAPTER_FORWARD, ((24, 3), (3, 3), (24, 3), (1, 24)), (3, 0))  # the layers' plan
    assert plan.bounds == (16, 32)  # x V first up to 16 rows, U G first above, x V transposed above 32
    graphs: list[torch.fx.GraphModule] = []

    def recording(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    def refuse(*args, **kwargs):
        raise AssertionError("opt_einsum planned inside the compiled forward")

    monkeypatch.setattr(opt_einsum, "contract_path", refuse)
    monkeypatch.setattr(opt_einsum, "contract_expression", refuse)
    compiled = torch.compile(lotr, fullgraph=True, dynamic=True, backend=recording)
    for rows in [3, 7, 12, 40, 33, 20]:
        x = torch.randn(rows, 24, generator=torch.Generator().manual_seed(rows))
        assert_same(loss_and_grads(compiled, lotr, x), loss_and_grads(lotr, lotr, x))
    assert len(graphs) == len(plan.paths) == 3  # one graph per order (guards on the bounds), not one per row count
    for graph in graphs:
        targets = {node.target for node in graph.graph.nodes if node.op == "call_function"}
        assert operator.matmul in targets
        assert not any("opt_einsum" in str(getattr(t, "__module__", "")) for t in targets)
    factors = lotr.lotr_factors["query+value"]
    assert factors.shared_input.entry is None and factors.shared_input.depth == 0
