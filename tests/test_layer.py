"""LoRALinear and the plain autograd op (lora/core/op.py) against float64 references, and in bf16
against fp32 runs within the op's own roundings."""
import pytest
import torch
import torch.nn as nn

from lora import LoRAConfig, LoRAError, LoRALinear
from lora.core.dropout import dropout_scale, dropped_positions
from lora.core.op import lora_linear_torch


def make_layer(inp=45, out=29, r=5, alpha=7.0, bias=True, dtype=torch.float32, dropout=0.0, init=False):
    base = nn.Linear(inp, out, bias=bias, dtype=dtype)
    return LoRALinear(base, r=r, alpha=alpha, dropout=dropout, init_lora_weights=init)


def reference(x, W, b, A, B, s, mask=None, dtype=torch.float64):
    """y = x Wᵀ + b + s (dropout(x) Aᵀ) Bᵀ by plain ops in `dtype` (float64 unless told)."""
    x, W, A, B = (t.to(dtype) for t in (x, W, A, B))
    xd = x if mask is None else x * mask.to(dtype)
    y = x @ W.T + s * (xd @ A.T) @ B.T
    return y + b.to(dtype) if b is not None else y


def fp32_run(x, W, b, A, B, s, dy, mask=None):
    """(y, dX, dA, dB) of the formula by autograd in fp32: the op under test is not involved."""
    x, A, B = (t.detach().float().requires_grad_() for t in (x, A, B))
    y = reference(x, W, b, A, B, s, mask, dtype=torch.float32)
    y.backward(dy.float())
    return y.detach(), x.grad, A.grad, B.grad


# bf16's unit roundoff u = eps/2: rounding a value to bf16 moves it by at most u·|value|.
BF16_U = torch.finfo(torch.bfloat16).eps / 2
# The op's roundings to bf16 on the longest path to each result, from inputs bf16 holds exactly:
#   y:  S = x Aᵀ, s · S, b + s · S Bᵀ, += x Wᵀ          dX: dY B, s · (dY B), dS A, += dY W
#   dA: dY B, s · (dY B), dSᵀ x                          dB: x Aᵀ, s · S, dYᵀ S
ROUNDINGS = {"y": 4, "dX": 4, "dA": 3, "dB": 3}


def assert_bf16_close(got, ref, roundings: int, what: str = ""):
    """‖got − ref‖ ≤ 2 · √(k/3) · u · ‖ref‖ for a result that k roundings to bf16 separate from `ref`
    (the same value from the same inputs in fp32). One rounding is a relative error spread evenly over
    ±u (RMS u/√3) of a value of about the result's magnitude; k independent ones add in quadrature; 2
    is the margin. The fp32 accumulation inside each GEMM (≤ K · 2⁻²⁴ relative for a reduction of
    length K ≤ 100 here) is far below one rounding. A per-element worst case (k · u · |value|) would
    hide a 1% error (2.6 u) entirely."""
    err, size = (got.double() - ref.double()).norm(), ref.double().norm()
    bound = 2 * (roundings / 3) ** 0.5 * BF16_U * size
    assert err <= bound, f"{what}: ‖got − ref‖ = {err:.3g} > {bound:.3g} ({err / (BF16_U * size):.2f} u · ‖ref‖)"


@pytest.mark.parametrize("shape", [(37, 45), (3, 13, 45)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_grads_match_float64_reference(shape, bias):
    torch.manual_seed(len(shape) + bias)
    layer = make_layer(bias=bias).train()
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)

    xr = x.detach().double().requires_grad_()
    Ar = layer.lora_A.detach().double().requires_grad_()
    Br = layer.lora_B.detach().double().requires_grad_()
    yr = reference(xr, layer.weight, layer.bias, Ar, Br, layer.scaling)
    yr.backward(dy.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad.double(), Ar.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad.double(), Br.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


def test_gradcheck_float64():
    torch.manual_seed(0)
    layer = make_layer(inp=9, out=7, r=3, dtype=torch.float64)
    layer.lora_A.data = layer.lora_A.data.double()
    layer.lora_B.data = layer.lora_B.data.double()
    x = torch.randn(2, 5, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B: lora_linear_torch(
        x, layer.weight, layer.bias, A, B, layer.scaling, 0.0), (x, layer.lora_A, layer.lora_B))
    # With dropout: a fixed seed makes the op deterministic, so gradcheck applies too.
    assert torch.autograd.gradcheck(lambda x, A, B: lora_linear_torch(
        x, layer.weight, layer.bias, A, B, layer.scaling, 0.3, seed=1234), (x, layer.lora_A, layer.lora_B))


def test_dropout_uses_the_same_mask_in_forward_and_backward():
    torch.manual_seed(3)
    layer = make_layer()
    x = torch.randn(31, 45, requires_grad=True)
    p, seed = 0.4, 98765
    y = lora_linear_torch(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, p, seed=seed)
    dy = torch.randn_like(y)
    y.backward(dy)
    mask = dropout_scale(x.detach(), p, seed)
    assert set(mask.unique().tolist()) == {0.0, torch.tensor(1 / (1 - p)).item()}
    assert abs((mask == 0).float().mean() - p) < 0.03
    assert torch.equal(mask, dropout_scale(x.detach(), p, seed)) and not torch.equal(mask, dropout_scale(x.detach(), p, seed + 1))
    xr = x.detach().double().requires_grad_()
    Ar = layer.lora_A.detach().double().requires_grad_()
    Br = layer.lora_B.detach().double().requires_grad_()
    yr = reference(xr, layer.weight, layer.bias, Ar, Br, layer.scaling, mask)
    yr.backward(dy.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad.double(), Ar.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad.double(), Br.grad, rtol=1e-5, atol=1e-5)


def test_dropout_only_in_training_mode():
    torch.manual_seed(4)
    layer = make_layer(dropout=0.5)
    x = torch.randn(8, 45)
    layer.eval()
    torch.testing.assert_close(layer(x).double(), reference(x, layer.weight, layer.bias, layer.lora_A,
                                                            layer.lora_B, layer.scaling), rtol=1e-5, atol=1e-5)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))     # fresh masks each call


def test_zero_B_is_the_base_layer_bit_for_bit():
    torch.manual_seed(5)
    base = nn.Linear(45, 29)
    x = torch.randn(2, 7, 45)
    expected = base(x)
    layer = LoRALinear(base, r=8, alpha=16, init_lora_weights=True)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert torch.equal(layer(x), expected)
    layer.train()
    assert torch.equal(layer(x), expected)


def bf16_exact_(layer):
    """Round every parameter to a value bf16 holds, in place: casting it to bf16 is then exact."""
    with torch.no_grad():
        for t in layer.parameters():
            t.copy_(t.bfloat16())
    return layer


@pytest.mark.parametrize("autocast", [False, True])
def test_bf16_matches_an_fp32_run_within_the_ops_roundings(autocast):
    """A bf16 base with an fp32 adapter (cast to bf16 by the layer), and an fp32 layer under bf16
    autocast: output and every grad against the formula run in fp32 on the same values. The inputs are
    values bf16 holds, so every difference is one of the op's own roundings (ROUNDINGS)."""
    torch.manual_seed(6)
    layer = bf16_exact_(make_layer(dtype=torch.float32 if autocast else torch.bfloat16))
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(37, 45).bfloat16()
    dy = torch.randn(37, 29).bfloat16()
    ref = fp32_run(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, dy)
    x = x.float().requires_grad_() if autocast else x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.backward(dy)
    assert x.grad.dtype == x.dtype and layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    for (name, k), got, want in zip(ROUNDINGS.items(), (y, x.grad, layer.lora_A.grad, layer.lora_B.grad), ref):
        assert_bf16_close(got, want, k, name)


def test_merge_is_one_rounding_idempotent_and_unmerge_restores():
    torch.manual_seed(7)
    layer = make_layer()
    x = torch.randn(13, 45)
    before = layer(x)
    W0 = layer.weight.detach().clone()
    layer.merge()
    expected = (W0.float() + (layer.lora_B.float() @ layer.lora_A.float()) * layer.scaling).to(W0.dtype)
    assert layer.merged and torch.equal(layer.weight, expected)
    layer.merge()                                   # idempotent
    assert torch.equal(layer.weight, expected)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, W0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_merge_bf16_rounds_once_from_fp32():
    torch.manual_seed(8)
    layer = make_layer(dtype=torch.bfloat16)
    W0 = layer.weight.detach().clone()
    layer.merge()
    fp32_sum = W0.float() + (layer.lora_B.float() @ layer.lora_A.float()) * layer.scaling
    assert torch.equal(layer.weight, fp32_sum.to(torch.bfloat16))      # one rounding to bf16
    exact = W0.double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    torch.testing.assert_close(layer.weight.double(), exact, rtol=2 ** -8, atol=0)   # within 1 bf16 ulp


def test_disable_adapter_context():
    torch.manual_seed(9)
    layer = make_layer()
    x = torch.randn(4, 45)
    with layer.disable_adapter():
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert not layer.disabled
    assert not torch.allclose(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        with layer.disable_adapter():
            pass


def test_init_modes_and_rslora_scaling():
    base = nn.Linear(64, 32)
    assert LoRALinear(base, r=16, alpha=32).scaling == 2.0
    assert LoRALinear(base, r=16, alpha=32, use_rslora=True).scaling == 8.0
    cfg = LoRAConfig(r=16, lora_alpha=32, use_rslora=True)          # the layer and the config agree
    assert LoRALinear(base, r=16, alpha=32, use_rslora=True).scaling == cfg.scaling_for("q_proj")
    for bad in ("pissa", 1):
        with pytest.raises(LoRAError, match="LoRALinear: init_lora_weights"):
            LoRALinear(base, r=4, alpha=8, init_lora_weights=bad)
    torch.manual_seed(0)
    g = LoRALinear(nn.Linear(2000, 8), r=4, alpha=8, init_lora_weights="gaussian")
    assert torch.count_nonzero(g.lora_B) == 0
    assert abs(g.lora_A.std().item() - 0.25) < 0.01
    k = LoRALinear(nn.Linear(2000, 8), r=4, alpha=8)
    bound = 1 / 2000 ** 0.5   # kaiming_uniform(a=sqrt(5)) on fan_in 2000
    assert k.lora_A.abs().max() <= bound and k.lora_A.abs().max() > 0.9 * bound


def test_parameter_names_keep_the_base_keys():
    layer = make_layer()
    assert set(dict(layer.named_parameters())) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.lora_A.shape == (5, 45) and layer.lora_B.shape == (29, 5)


def test_dropout_mask_statistics_and_unbiasedness():
    like = torch.empty(400, 1000)
    for p in (0.05, 0.3, 0.9):
        m = dropout_scale(like, p, seed=11)
        assert abs((m == 0).float().mean().item() - p) < 0.005
        assert abs(m.double().mean().item() - 1.0) < 0.01              # E[mask] = 1
    odd = dropout_scale(torch.empty(3, 5, 7), 0.5, seed=3)
    assert odd.shape == (3, 5, 7) and 0 < (odd == 0).sum() < 105


def test_dropped_positions_are_iid_bernoulli():
    n, p = 200_000, 0.05
    drops = torch.zeros(n, dtype=torch.bool)
    drops[dropped_positions(n, p, seed=5)] = True
    assert torch.equal(dropped_positions(n, p, seed=5), dropped_positions(n, p, seed=5))
    assert not torch.equal(dropped_positions(n, p, seed=5)[:100], dropped_positions(n, p, seed=6)[:100])
    # Count within 5 sigma; no position favoured (first and second half, even and odd); independence
    # of neighbours: P(drop at i+1 | drop at i) = p.
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(drops.sum().item() - n * p) < 5 * sigma
    for part in (drops[: n // 2], drops[n // 2:], drops[0::2], drops[1::2]):
        assert abs(part.float().mean().item() - p) < 5 * (p * (1 - p) / part.numel()) ** 0.5
    pairs = (drops[:-1] & drops[1:]).sum().item() / drops[:-1].sum().item()
    assert abs(pairs - p) < 5 * (p * (1 - p) / drops.sum().item()) ** 0.5
    # The last element is reachable and numel of 1 works.
    last = sum(dropped_positions(7, 0.5, seed=s)[-1:].tolist() == [6] for s in range(200))
    assert 70 < last < 130
    assert dropped_positions(1, 0.999999, seed=1).tolist() == [0]


