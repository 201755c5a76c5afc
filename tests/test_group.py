"""Shared-input groups (q/k/v, gate/up): one shrink, same results as one op per projection."""
import copy

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRAConfig, LoRALinear
from lora.core.functional import dropout_scale
from lora.core.group import GroupedLoRAFunction, SharedInputGroup
from test_inject import randomize_B


def members(bias=(True, False, True), ranks=(3, 5, 2), outs=(29, 13, 13), inp=45, dtype=torch.float64):
    torch.manual_seed(0)
    return [LoRALinear(nn.Linear(inp, o, bias=b, dtype=dtype), r=r, alpha=2.0 + r, init_lora_weights=False,
                       lora_dtype=dtype) for b, r, o in zip(bias, ranks, outs)]


def apply_group(ms, x, p, seed):
    return GroupedLoRAFunction.apply(x, p, seed, tuple(m.scaling for m in ms), None, *[m.weight for m in ms],
                                     *[m.bias for m in ms], *[m.lora_A for m in ms], *[m.lora_B for m in ms])


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_grouped_function_gradcheck_float64(p):
    ms = members(outs=(9, 5, 5), inp=11)
    x = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    params = [t for m in ms for t in (m.lora_A, m.lora_B)]

    def f(x, *ab):
        for m, (A, B) in zip(ms, zip(ab[0::2], ab[1::2])):
            m.lora_A, m.lora_B = A, B   # plain tensors for gradcheck's perturbed copies
        return apply_group(ms, x, p, 4321)
    saved = [(m.lora_A, m.lora_B) for m in ms]
    try:
        assert torch.autograd.gradcheck(f, (x, *params))
    finally:
        for m, (A, B) in zip(ms, saved):
            m.lora_A, m.lora_B = A, B


def test_grouped_function_matches_float64_reference_with_shared_mask():
    ms = members(dtype=torch.float32)
    for m in ms:
        m.lora_A, m.lora_B = nn.Parameter(m.lora_A.float()), nn.Parameter(m.lora_B.float())
    x = torch.randn(37, 45, requires_grad=True)
    p, seed = 0.25, 77
    outs = apply_group(ms, x, p, seed)
    dys = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, dys)
    mask = dropout_scale(x.detach(), p, seed).double()
    xr = x.detach().double().requires_grad_()
    refs, leaves = [], []
    for m in ms:
        A = m.lora_A.detach().double().requires_grad_()
        B = m.lora_B.detach().double().requires_grad_()
        y = xr @ m.weight.double().T + m.scaling * ((xr * mask) @ A.T) @ B.T
        refs.append(y + m.bias.double() if m.bias is not None else y)
        leaves.append((A, B))
    torch.autograd.backward(refs, [d.double() for d in dys])
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    for m, (A, B) in zip(ms, leaves):
        torch.testing.assert_close(m.lora_A.grad.double(), A.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m.lora_B.grad.double(), B.grad, rtol=1e-5, atol=1e-5)


def test_model_with_groups_equals_model_without(tiny_llama, token_ids, monkeypatch):
    cfg = LoRAConfig(r=4, rank_pattern={"k_proj": 2}, alpha_pattern={"up_proj": 3})
    plain = lora.apply_lora(copy.deepcopy(tiny_llama), cfg, group_shared_inputs=False)
    grouped = lora.apply_lora(tiny_llama, cfg)
    randomize_B(plain)
    grouped.load_state_dict(plain.state_dict())
    calls = []
    real = GroupedLoRAFunction.apply
    monkeypatch.setattr(GroupedLoRAFunction, "apply", lambda *a: calls.append(1) or real(*a))
    for m in (plain, grouped):
        m.train()
    lp = plain(token_ids, labels=token_ids)
    lg = grouped(token_ids, labels=token_ids)
    assert len(calls) == 2 * 3                        # one per (q,k,v) and per (gate,up) in 3 layers
    torch.testing.assert_close(lg.logits, lp.logits, rtol=1e-5, atol=1e-5)
    lp.loss.backward()
    lg.loss.backward()
    gp = dict(plain.named_parameters())
    for name, p in grouped.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, gp[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_groups_never_hand_out_a_stale_output():
    q, k, v = members(bias=(True, True, True), outs=(29, 13, 13), dtype=torch.float32)
    group = SharedInputGroup([q, k, v])
    for m in (q, k, v):
        m.group = group
    ref = lambda m, x: nn.functional.linear(x, m.weight, m.bias) + m.scaling * (x @ m.lora_A.T) @ m.lora_B.T
    x1, x2 = torch.randn(5, 45), torch.randn(5, 45)
    torch.testing.assert_close(q(x1), ref(q, x1))
    torch.testing.assert_close(k(x2), ref(k, x2))       # a different input: recomputed, not x1's
    torch.testing.assert_close(v(x1), ref(v, x1))       # x1's pending output was dropped with x2's call
    q(x1)
    x1.mul_(2)                                           # in-place change between the calls
    torch.testing.assert_close(k(x1), ref(k, x1))
    q(x1)
    with torch.no_grad():
        q.lora_B.add_(1.0)                               # a parameter update between the calls
    torch.testing.assert_close(k(x1), ref(k, x1))
    torch.testing.assert_close(k(x1), ref(k, x1))       # called twice: second call recomputes
    q.merge()                                            # a merged member turns grouping off
    torch.testing.assert_close(k(x1), ref(k, x1))
    torch.testing.assert_close(q(x1), nn.functional.linear(x1, q.weight, q.bias))


def test_group_under_autocast_bf16(tiny_llama, token_ids):
    lora.apply_lora(tiny_llama, LoRAConfig(r=4))
    randomize_B(tiny_llama)
    ref = tiny_llama(token_ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_llama(token_ids).logits
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
