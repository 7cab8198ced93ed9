"""torch.compile(fullgraph=True) over models with LoTR adapters.

Inductor compiles for tens of seconds on a 2-core machine, so one test uses it, on a one-layer
Llama; the other captures graphs with a recording backend on a small plain module, where
dynamo traces in about a second.
"""

from __future__ import annotations

import operator

import opt_einsum
import pytest
import torch
from models import VOCAB, inputs
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import tensorlotr as tlr
from tensorlotr.nn.layer import ADAPTER_FORWARD, plan_batched


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def one_layer_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def randomise(lotr: tlr.LoTRModel) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lotr.lotr_layers():
            layer.lotr_core.copy_(torch.randn(layer.lotr_core.shape, generator=generator))


def loss_and_grads(model, lotr: tlr.LoTRModel, *args, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    lotr.zero_grad()
    out = model(*args, **kwargs)
    loss = (out.logits if hasattr(out, "logits") else out).float().pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lotr.named_parameters() if p.requires_grad}


def assert_same(compiled, eager) -> None:
    (loss, grads), (eager_loss, eager_grads) = compiled, eager
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_inductor_fullgraph_matches_eager_forward_and_backward():
    groups = {"q": ["q_proj"], "kv": ["k_proj", "v_proj"]}  # k and v share x V: the cache is bypassed
    lotr = tlr.get_lotr_model(one_layer_llama(), tlr.LoTRConfig(rank=4, groups=groups))
    randomise(lotr)
    lotr.train()
    batch = inputs()
    eager = loss_and_grads(lotr, lotr, **batch)
    compiled = loss_and_grads(torch.compile(lotr, fullgraph=True), lotr, **batch)
    assert len(compiled[1]) == 2 * 2 + 3  # U and V of two groups, one core per adapted layer
    assert_same(compiled, eager)


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


def test_compiled_graphs_hold_plain_matmuls_no_planning_and_follow_the_row_count(monkeypatch):
    lotr = tlr.get_lotr_model(
        Stack(), tlr.LoTRConfig(rank=3, target_modules=["query", "value"], groups="shared", init="normal")
    )
    randomise(lotr)
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
