"""Shared-input groups (q/k/v, gate/up): one shrink, same results as one op per projection."""
import copy

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRAConfig, LoRALinear
from lora.core.dropout import dropout_scale
from lora.core.group import SharedInputGroup
from lora.core.op import LoRAFunction, lora_group_torch, lora_linear_torch
from test_inject import randomize_B
from test_layer import ROUNDINGS, assert_bf16_close, bf16_exact_, fp32_run


def members(bias=(True, False, True), ranks=(3, 5, 2), outs=(29, 13, 13), inp=45, dtype=torch.float64):
    torch.manual_seed(0)
    return [LoRALinear(nn.Linear(inp, o, bias=b, dtype=dtype), r=r, alpha=2.0 + r, init_lora_weights=False,
                       lora_dtype=dtype) for b, r, o in zip(bias, ranks, outs)]


def apply_group(ms, x, p, seed):
    return lora_group_torch(x, [m.weight for m in ms], [m.bias for m in ms], [m.lora_A for m in ms],
                            [m.lora_B for m in ms], [m.scaling for m in ms], p, seed=seed)


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
    real = LoRAFunction.apply
    monkeypatch.setattr(LoRAFunction, "apply", lambda *a: calls.append(len(a[3])) or real(*a))   # a[3]: the scalings
    for m in (plain, grouped):
        m.train()
    lp = plain(token_ids, labels=token_ids)
    lg = grouped(token_ids, labels=token_ids)
    # per layer: plain, one op per projection; grouped, (q,k,v), o, (gate,up), down
    assert calls == [1] * 7 * 3 + [3, 1, 2, 1] * 3
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


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_grouped_op_in_bf16_matches_the_ungrouped_op_and_an_fp32_run(p):
    """q/k/v in bf16, grouped and one op per member (the same seed draws the same mask), against the
    formula run in fp32 on the same values (values bf16 holds: every difference is a rounding)."""
    ms = [bf16_exact_(m) for m in members(dtype=torch.float32)]
    x = torch.randn(37, 45).bfloat16()
    dys = [torch.randn(37, m.out_features).bfloat16() for m in ms]
    seed = 77
    mask = dropout_scale(x, p, seed).float() if p > 0 else None
    refs = [fp32_run(x, m.weight, m.bias, m.lora_A, m.lora_B, m.scaling, dy, mask) for m, dy in zip(ms, dys)]
    ref = {"y": [r[0] for r in refs], "dX": [sum(r[1] for r in refs)],
           "dA": [r[2] for r in refs], "dB": [r[3] for r in refs]}
    runs = {}
    for grouped in (True, False):
        xs = x.clone().requires_grad_()
        ps = [(m.weight.bfloat16(), None if m.bias is None else m.bias.bfloat16(),
               m.lora_A.detach().bfloat16().requires_grad_(), m.lora_B.detach().bfloat16().requires_grad_())
              for m in ms]
        W, b, A, B = zip(*ps)
        scalings = [m.scaling for m in ms]
        if grouped:
            ys = lora_group_torch(xs, W, b, A, B, scalings, p, seed=seed)
        else:
            ys = [lora_linear_torch(xs, *t, s, p, seed=seed) for t, s in zip(ps, scalings)]
        torch.autograd.backward(ys, dys)
        assert all(t.dtype == torch.bfloat16 for t in (*ys, xs.grad, *(t.grad for t in A)))
        runs[grouped] = {"y": ys, "dX": [xs.grad], "dA": [t.grad for t in A], "dB": [t.grad for t in B]}
    # Roundings per result: test_layer.ROUNDINGS, plus with dropout the 1/(1 − p) on S (y, dB) or dS
    # (dX, dA); dX has n − 1 more: grouped, one `+= dY_i W_i` a member; ungrouped, autograd's sums of
    # the n members' bf16 dX.
    k = {name: v + (p > 0) for name, v in ROUNDINGS.items()}
    k["dX"] += len(ms) - 1
    for name, wants in ref.items():
        for i, want in enumerate(wants):
            for grouped in (True, False):
                assert_bf16_close(runs[grouped][name][i], want, k[name], f"{name}[{i}] grouped={grouped}")
            # The two differ at most in all of their roundings.
            assert_bf16_close(runs[True][name][i], runs[False][name][i], 2 * k[name], f"{name}[{i}] grouped vs not")


def test_groups_under_bf16_autocast_match_the_fp32_run_and_the_ungrouped_model(tiny_llama, token_ids):
    """Logits under bf16 autocast, parameters that bf16 holds: against the same grouped model in fp32
    within the model's bf16 roundings, and against the ungrouped model within the shrink's."""
    bf16_exact_(tiny_llama)
    cfg = LoRAConfig(r=4, rank_pattern={"k_proj": 2}, alpha_pattern={"up_proj": 3})
    plain = lora.apply_lora(copy.deepcopy(tiny_llama), cfg, group_shared_inputs=False)
    randomize_B(plain, seed=3)
    bf16_exact_(plain)
    grouped = lora.apply_lora(tiny_llama, cfg)
    grouped.load_state_dict(plain.state_dict())
    ref = grouped(token_ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_plain = grouped(token_ids).logits, plain(token_ids).logits
    assert out.dtype == torch.bfloat16
    # The longest bf16 path rounds 14 times a decoder layer (the norm's output cast, q, RoPE's three ops,
    # q·kᵀ, softmax, ·V, o_proj; the norm's output cast, gate, silu, ⊙ up, down), then twice more
    # (the final norm's output cast, lm_head).
    assert_bf16_close(out, ref, 3 * 14 + 2, "logits vs fp32")
    # Grouping changes no rounding of the forward but, at most, the shared shrink's S: one a layer.
    assert_bf16_close(out, out_plain, 3, "logits vs ungrouped")
