"""LoRA over a 4-bit NF4 base (lora/quant/linear.py, lora/core/op.py): outputs and gradients against
float64 on the dequantized weight, bit-identical to the same layer over the dequantized weight as a
dense base, and nothing of the dense weight's size kept for backward."""
import copy

import pytest
import torch
import torch.nn as nn

from lora import LoRAConfig, LoRAError, LoRALinear, apply_lora
from lora.core.inject import output_head_names
from lora.quant.linear import NF4Linear, quantize_linears
from lora.quant.nf4 import NF4Weight


def saved_shapes(fn):
    """(fn(), the shapes of every tensor autograd saved for backward while it ran)."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


def nf4_base(inp=131, out=67, bias=True, dtype=torch.float32):
    torch.manual_seed(0)
    return NF4Linear.from_linear(nn.Linear(inp, out, bias=bias, dtype=dtype))


def dense_twin(base: NF4Linear) -> nn.Linear:
    """An nn.Linear holding base's dequantized weight (its own dtype) and bias."""
    lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=base.weight.dtype)
    lin.weight.data.copy_(base.weight.dequantize())
    if base.bias is not None:
        lin.bias.data.copy_(base.bias)
    return lin


def grads(layer, x, dy, seed=4):
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    y, shapes = saved_shapes(lambda: layer(x))
    y.backward(dy)
    return y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad, shapes


def test_lora_over_nf4_against_float64():
    base = nf4_base()
    W, b = base.weight.dequantize(torch.float64), base.bias.double()               # (out, in), (out,)
    layer = LoRALinear(base, r=5, alpha=9.0, init_lora_weights=False)
    x, dy = torch.randn(3, 7, 131), torch.randn(3, 7, 67)
    y, dX, dA, dB, shapes = grads(layer, x, dy)
    assert not {(67, 131), (131, 67)} & set(shapes)                                # the packed weight only
    x64, A, B = (t.detach().double().requires_grad_() for t in (x, layer.lora_A, layer.lora_B))
    y64 = x64 @ W.T + b + layer.scaling * (x64 @ A.T) @ B.T
    y64.backward(dy.double())
    for got, ref in ((y, y64), (dX, x64.grad), (dA, A.grad), (dB, B.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_nf4_base_is_the_dequantized_dense_base_bit_for_bit(dtype, dropout):
    base = nf4_base(dtype=dtype)
    quant = LoRALinear(base, r=4, alpha=8.0, dropout=dropout, init_lora_weights=False).train()
    dense = LoRALinear(dense_twin(base), r=4, alpha=8.0, dropout=dropout, init_lora_weights=False).train()
    dense.lora_A.data.copy_(quant.lora_A)
    dense.lora_B.data.copy_(quant.lora_B)
    x, dy = torch.randn(5, 131, dtype=dtype), torch.randn(5, 67, dtype=dtype)
    for got, ref in zip(grads(quant, x, dy)[:4], grads(dense, x, dy)[:4]):
        assert torch.equal(got, ref)


def test_frozen_nf4_linear_against_float64_keeps_no_dense_weight():
    base = nf4_base(inp=200, out=45)
    x = torch.randn(2, 3, 200, requires_grad=True)
    y, shapes = saved_shapes(lambda: base(x))
    assert not {(45, 200), (200, 45)} & set(shapes)
    dy = torch.randn_like(y)
    y.backward(dy)
    W = base.weight.dequantize(torch.float64)
    torch.testing.assert_close(y.double(), x.double() @ W.T + base.bias.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), dy.double() @ W, rtol=1e-5, atol=1e-5)
    assert base.bias.grad is None and not base.bias.requires_grad


def test_quantized_llama_trains_grouped_like_its_dense_twin(tiny_llama, token_ids):
    dense = copy.deepcopy(tiny_llama)
    quant = quantize_linears(tiny_llama, skip=output_head_names(tiny_llama))
    kinds = {type(m).__name__ for n, m in quant.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {"NF4Linear", "Linear"} and type(quant.lm_head) is nn.Linear
    assert type(quant.model.embed_tokens) is nn.Embedding
    dense_modules = dict(dense.named_modules())
    for name, m in quant.named_modules():
        if isinstance(m, NF4Linear):
            dense_modules[name].weight.data.copy_(m.weight.dequantize())
    cfg = LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    torch.manual_seed(3)
    apply_lora(quant, cfg)
    torch.manual_seed(3)
    apply_lora(dense, cfg)
    assert quant.model.layers[0].self_attn.q_proj.group is not None               # the shared-input path
    outs = []
    for model in (quant, dense):
        model.train()
        loss = model(token_ids, labels=token_ids).loss
        loss.backward()
        outs.append((loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-6)
    for g, h in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


def test_dtype_casts_keep_the_format_and_merge_is_refused(tiny_llama):
    quant = quantize_linears(tiny_llama, skip=output_head_names(tiny_llama)).to(torch.bfloat16)
    w = quant.model.layers[0].mlp.down_proj.weight
    assert isinstance(w, NF4Weight) and w.nested_absmax.dtype == torch.float32 and w.dtype == torch.float32
    apply_lora(quant, LoRAConfig(r=2, target_modules=["q_proj"]))
    q = quant.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        quant(torch.tensor([[1, 2, 3]]))                                          # runs in bf16
    with pytest.raises(LoRAError, match="4-bit base"):
        q.merge()
    with q.disable_adapter():
        x = torch.randn(2, 48, dtype=torch.bfloat16)
        assert torch.equal(q(x), NF4Linear(q.weight, q.bias)(x))


def test_graph_safe_path_over_nf4_is_the_dense_twins():
    """HPU's graph-safe form (dropout from the device RNG, no host-side seed): an NF4 base gives the
    dense twin's output and gradients."""
    from lora.core import backend
    base = nf4_base()
    quant = LoRALinear(base, r=4, alpha=8.0, dropout=0.3, init_lora_weights=False).train()
    dense = LoRALinear(dense_twin(base), r=4, alpha=8.0, dropout=0.3, init_lora_weights=False).train()
    dense.lora_A.data.copy_(quant.lora_A)
    dense.lora_B.data.copy_(quant.lora_B)
    x, dy = torch.randn(6, 131), torch.randn(6, 67)
    backend.set_graph_safe(True)
    try:
        results = [grads(layer, x, dy) for layer in (quant, dense)]
    finally:
        backend.set_graph_safe(False)
    assert not {(67, 131), (131, 67)} & set(results[0][4])
    for got, ref in zip(results[0][:4], results[1][:4]):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
