"""x V shared by sibling layers of a group in one parent (the sharing hooks): fewer products, the same results."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from builders import inputs, randomise_cores, tiny_bert, tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

import tensorlotr as tlr
from tensorlotr.nn.sharing import SHARE_MIN_ROWS

#: 4 x 8 = 32 rows: enough for sibling layers to share x V
ROWS = {"batch": 4, "length": 8}


assert ROWS["batch"] * ROWS["length"] >= SHARE_MIN_ROWS


class CountMatmuls(TorchDispatchMode):
    """Counts the matrix products torch runs inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


def shared_bert(**config) -> tlr.LoTRModel:
    lotr = tlr.get_lotr_model(
        tiny_bert(), tlr.LoTRConfig(rank=4, target_modules=["query", "value"], groups="shared", **config)
    )
    randomise_cores(lotr)
    return lotr


def stop_sharing(lotr: tlr.LoTRModel) -> None:
    for handle in lotr._sharing_hooks:
        handle.remove()


def test_shared_group_computes_x_v_once_per_attention_block():
    lotr = shared_bert()
    batch = inputs(**ROWS)
    with torch.no_grad(), CountMatmuls() as shared:
        expected = lotr(**batch).logits
    stop_sharing(lotr)
    with torch.no_grad(), CountMatmuls() as separate:
        again = lotr(**batch).logits
    assert separate.count - shared.count == 3  # one x V saved in each of the 3 layers
    torch.testing.assert_close(expected, again, rtol=0, atol=0)


def test_one_token_computes_x_v_per_layer():
    lotr = shared_bert()
    token = inputs(batch=1, length=1)
    with torch.no_grad(), CountMatmuls() as with_hooks:
        expected = lotr(**token).logits
    stop_sharing(lotr)
    with torch.no_grad(), CountMatmuls() as without:
        again = lotr(**token).logits
    assert with_hooks.count == without.count  # below SHARE_MIN_ROWS the lookup would cost more than the product
    torch.testing.assert_close(expected, again, rtol=0, atol=0)


def test_by_name_groups_share_nothing():
    lotr = tlr.get_lotr_model(tiny_bert(), tlr.LoTRConfig(rank=4, target_modules=["query", "value"]))
    assert lotr._sharing_hooks == []


def test_shared_product_gives_the_same_gradients():
    lotr = shared_bert()
    lotr.train()
    batch = inputs(**ROWS)

    def gradients():
        torch.manual_seed(0)  # the same dropout masks in BERT's own dropout layers
        lotr.zero_grad()
        lotr(**batch).logits.pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in lotr.named_parameters() if p.requires_grad}

    with_sharing = gradients()
    stop_sharing(lotr)
    without = gradients()
    assert with_sharing.keys() == without.keys()
    for name, grad in with_sharing.items():
        # the summation order differs (x^T (g_q + g_v) against x^T g_q + x^T g_v): float rounding only
        assert (grad - without[name]).norm() <= 1e-5 * without[name].norm(), name


def test_shared_product_is_dropped_when_the_parent_returns_or_raises():
    lotr = shared_bert()
    factors = lotr.lotr_factors["query+value"]
    attention = lotr.base_model.bert.encoder.layer[0].attention.self
    seen = []
    attention.value.register_forward_hook(lambda *_: seen.append(factors.shared_input.entry))
    lotr.train()
    lotr(**inputs(**ROWS)).logits.sum().backward()
    assert seen and seen[0] is not None  # held while the attention block ran
    assert factors.shared_input.entry is None and factors.shared_input.depth == 0
    product = weakref.ref(seen.pop()[2])
    gc.collect()
    assert product() is None  # nothing keeps the product (or its graph) alive after the forward

    def fail(*_):
        raise RuntimeError("boom")

    handle = attention.value.register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        lotr(**inputs(**ROWS))
    handle.remove()
    assert factors.shared_input.entry is None and factors.shared_input.depth == 0


def test_no_sharing_with_active_dropout_or_across_modes():
    lotr = shared_bert(dropout=0.3)
    lotr.train()
    batch = inputs(**ROWS)
    torch.manual_seed(3)
    with torch.no_grad(), CountMatmuls() as train_count:
        first = lotr(**batch).logits
    stop_sharing(lotr)
    torch.manual_seed(3)
    with torch.no_grad(), CountMatmuls() as separate:
        second = lotr(**batch).logits
    assert train_count.count == separate.count  # each layer draws its own dropout mask, as before
    torch.testing.assert_close(first, second, rtol=0, atol=0)

    layer = lotr.base_model.bert.encoder.layer[0].attention.self.query
    factors = layer.factors
    x = torch.randn(4, 8, 32)
    layer.eval()
    factors.shared_input.enter()
    try:
        with torch.no_grad():
            layer(x)
        held = factors.shared_input.entry
        layer(x)  # with grad: the no-grad product is not reused
        assert factors.shared_input.entry is not held and factors.shared_input.entry[2].requires_grad
        with torch.no_grad():
            x.add_(1.0)  # changed in place: computed again
            layer(x)
        assert factors.shared_input.entry[1][0] == x._version
    finally:
        factors.shared_input.exit()
    assert factors.shared_input.entry is None


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_with_a_shared_group():
    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_llama()
        lotr = tlr.get_lotr_model(
            model, tlr.LoTRConfig(rank=4, target_modules=["k_proj", "v_proj"], groups="shared", init="normal")
        )
        randomise_cores(lotr)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lotr.train()
        lotr(**inputs(**ROWS)).logits.pow(2).mean().backward()
        return {n: p.grad for n, p in lotr.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_unload_removes_the_sharing_hooks():
    lotr = shared_bert()
    attention = lotr.base_model.bert.encoder.layer[0].attention.self
    assert attention._forward_pre_hooks and attention._forward_hooks
    lotr.unload()
    assert not attention._forward_pre_hooks and not attention._forward_hooks
