"""DoRA (lora/core/dora.py): the factored norm against the dense one in float64, the plain op's output
and gradients against a float64 reference of PEFT's formula with the norm detached, the layer's
identities, PEFT interop both ways, merging equal to PEFT's, an NF4 base, the flag and the demo."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import lora
from lora import LoRAConfig, LoRAError, LoRALinear
from lora.core import backend, dora
from lora.core.dropout import dropout_scale
from lora.quant import quantize_nf4

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rand(*shape, g, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def reference(x, W, b, A, B, m, s, mask=None):
    """PEFT's DoRA forward in float64 with n = ‖W + s·B A‖_row detached (mask: dropout's 0 or 1/(1 − p))."""
    x, W, A, B, m = (t.double() for t in (x, W, A, B, m))
    n = torch.linalg.vector_norm(W + s * B.detach() @ A.detach(), dim=1).detach()
    g = m / n
    xd = x if mask is None else x * mask.double()
    y = x @ W.T + (g - 1) * (xd @ W.T) + g * (s * (xd @ A.T) @ B.T)
    return y if b is None else y + b.double()


# -- the factored norm ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "nf4"])
def test_factored_norm_equals_the_dense_norm(dtype, monkeypatch):
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r, s = 37, 96, 5, 1.7
    W = rand(out_f, in_f, g=g)
    if dtype == "nf4":
        monkeypatch.setattr(dora, "_BLOCK_ELEMS", 200)       # several row blocks, not aligned to rows
        weight = quantize_nf4(W, block_size=64)
        W64 = weight.dequantize(torch.float32).double()
    else:
        monkeypatch.setattr(dora, "_BLOCK_ELEMS", 300)
        weight = W.to(dtype)
        W64 = weight.double()
    A, B = rand(r, in_f, g=g, scale=0.3), rand(out_f, r, g=g, scale=0.3)
    dense = torch.linalg.vector_norm(W64 + s * B.double() @ A.double(), dim=1)
    w_sq = dora.weight_sq_norms(weight)
    torch.testing.assert_close(w_sq, W64.square().sum(1), rtol=1e-13, atol=0)
    got = dora.weight_norm(weight, A, B, s, w_sq)
    assert got.dtype == torch.float32 and got.shape == (out_f,)
    torch.testing.assert_close(got.double(), dense, rtol=2e-6, atol=0)


def test_factored_norm_is_exact_for_B_zero():
    W = torch.randn(9, 13, dtype=torch.float64).float()
    got = dora.weight_norm(W, torch.randn(3, 13), torch.zeros(9, 3), 2.0, dora.weight_sq_norms(W))
    assert torch.equal(got, dora.weight_sq_norms(W).sqrt().float())


# -- the plain op ------------------------------------------------------------------------------------
def _inputs(seed, M=23, in_f=45, out_f=29, r=5, bias=True, zero_m_row=False):
    g = torch.Generator().manual_seed(seed)
    x = rand(3, M // 3 + 1, in_f, g=g)
    W, A, B = rand(out_f, in_f, g=g, scale=0.2), rand(r, in_f, g=g, scale=0.2), rand(out_f, r, g=g, scale=0.2)
    b = rand(out_f, g=g) if bias else None
    m = torch.linalg.vector_norm(W, dim=1) * (1 + 0.3 * rand(out_f, g=g))
    if zero_m_row:
        m[3] = 0.0
    return x, W, b, A, B, m, rand(*x.shape[:-1], out_f, g=g)


def _run(fn, x, W, b, A, B, m, dy, s, p, **kw):
    x, A, B, m = (t.detach().clone().requires_grad_() for t in (x, A, B, m))
    n = dora.weight_norm(W, A, B, s, dora.weight_sq_norms(W))
    y = fn(x, W, b, A, B, m, n, s, p, **kw)
    y.backward(dy)
    return y.detach(), x.grad, A.grad, B.grad, m.grad


def _reference_run(x, W, b, A, B, m, dy, s, mask=None):
    x, A, B, m = (t.detach().double().requires_grad_() for t in (x, A, B, m))
    y = reference(x, W, b, A, B, m, s, mask)
    y.backward(dy.double())
    return y.detach(), x.grad, A.grad, B.grad, m.grad


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("zero_m_row", [False, True])
def test_op_output_and_grads_against_float64(p, bias, zero_m_row):
    x, W, b, A, B, m, dy = _inputs(1 + int(p * 10) + 2 * bias + 4 * zero_m_row, bias=bias, zero_m_row=zero_m_row)
    s, seed = 1.4, 1234
    got = _run(dora.dora_linear_torch, x, W, b, A, B, m, dy, s, p, seed=seed)
    mask = dropout_scale(x, p, seed) if p else None
    want = _reference_run(x, W, b, A, B, m, dy, s, mask)
    for name, a, e in zip(("y", "dX", "dA", "dB", "dm"), got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=2e-5, msg=name)


def test_op_with_the_input_rebuilt_in_backward():
    """x a product whose factors autograd keeps (RMSNorm-like): backward multiplies it again."""
    xa, W, b, A, B, m, dy = _inputs(7)
    w = (torch.rand(xa.shape[-1], dtype=torch.float32) + 0.5).requires_grad_()    # both factors saved
    for p in (0.0, 0.25):
        h = xa.detach().clone().requires_grad_()
        x = h * w                                                    # saved factors: w (and h)
        A1, B1, m1 = (t.clone().requires_grad_() for t in (A, B, m))
        n = dora.weight_norm(W, A1, B1, 1.3, dora.weight_sq_norms(W))
        assert dora.input_recipe(x, True) is not None
        dora.dora_linear_torch(x, W, b, A1, B1, m1, n, 1.3, p, seed=5).backward(dy)
        mask = dropout_scale(xa, p, 5) if p else None
        want = _reference_run(xa * w.detach(), W, b, A, B, m, dy, 1.3, mask)
        for name, a, e in zip(("dA", "dB", "dm"), (A1.grad, B1.grad, m1.grad), want[2:]):
            torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=2e-5, msg=name)
        torch.testing.assert_close(h.grad.double(), want[1] * w.detach().double(), rtol=2e-5, atol=2e-5)


def test_graph_safe_path_is_the_same_formula():
    x, W, b, A, B, m, dy = _inputs(11)
    got = _run(dora.dora_linear_graph_safe, x, W, b, A, B, m, dy, 0.9, 0.0)
    want = _reference_run(x, W, b, A, B, m, dy, 0.9)
    for a, e in zip(got, want):
        torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=2e-5)
    torch.manual_seed(0)                                              # dropout from the device RNG: runs, finite
    y, *grads = _run(dora.dora_linear_graph_safe, x, W, b, A, B, m, dy, 0.9, 0.2)
    assert all(torch.isfinite(t).all() for t in (y, *grads))


def test_layer_graph_safe_mode_uses_plain_ops(monkeypatch):
    layer = _dora_layer()
    monkeypatch.setattr(backend, "_GRAPH_SAFE", True)
    called = []
    monkeypatch.setattr(backend, "dora_linear_torch", lambda *a, **k: called.append(1))
    layer.train()
    layer(torch.randn(2, 3, layer.in_features)).sum().backward()
    assert not called and layer.lora_magnitude_vector.grad is not None


# -- the layer -----------------------------------------------------------------------------------------
def _dora_layer(inp=45, out=29, r=5, bias=True, dtype=torch.float32, init=False, dropout=0.0):
    torch.manual_seed(0)
    base = nn.Linear(inp, out, bias=bias, dtype=dtype)
    return LoRALinear(base, r=r, alpha=7.0, dropout=dropout, init_lora_weights=init, use_dora=True)


def test_step0_is_the_base_bit_for_bit():
    layer = _dora_layer(init=True)
    x = torch.randn(4, 7, 45)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    layer = _dora_layer(init=False)            # B random: m = ‖W + s·B A‖, so y is plain LoRA's at step 0
    want = layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T + nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_and_disable(dtype):
    layer = _dora_layer(dtype=dtype).eval()
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(29))
    x = torch.randn(5, 45, dtype=dtype)
    W0 = layer.weight.detach().clone()
    y = layer(x).detach()
    with layer.disable_adapter():
        assert torch.equal(layer(x), nn.functional.linear(x, W0, layer.bias))
    layer.merge()
    V = W0.float() + (layer.lora_B.detach() @ layer.lora_A.detach()) * layer.scaling       # PEFT's order
    want = (layer.lora_magnitude_vector.detach() / torch.linalg.vector_norm(V, dim=1)).unsqueeze(1) * V
    assert torch.equal(layer.weight, want.to(dtype))                          # one rounding
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(layer(x).float(), y.float(), rtol=tol, atol=tol)
    layer.unmerge()
    torch.testing.assert_close(layer.weight.float(), W0.float(), rtol=tol / 10, atol=tol / 10)
    torch.testing.assert_close(layer(x).float(), y.float(), rtol=tol, atol=tol)


def test_norm_cache_follows_the_weight_and_the_factors():
    layer = _dora_layer()
    n0 = layer.dora_norm()
    with torch.no_grad():
        layer.weight.mul_(2)                                                   # an in-place change: new version
    torch.testing.assert_close(layer.dora_norm(), dora.dense_weight_norm(layer.weight, layer.lora_A,
                                                                         layer.lora_B, layer.scaling))
    assert not torch.allclose(layer.dora_norm(), n0)
    n1 = layer.dora_norm()
    assert layer.dora_norm() is n1                                             # nothing changed: cached
    with torch.no_grad():
        layer.lora_B.add_(0.1)                                                 # an optimizer step's in-place update
    torch.testing.assert_close(layer.dora_norm(), dora.dense_weight_norm(layer.weight, layer.lora_A,
                                                                         layer.lora_B, layer.scaling))


def test_weighted_or_multi_adapter_merge_with_dora_is_one_line():
    from lora.core.delta import Term, merged_weight
    t = Term(torch.randn(2, 4), torch.randn(3, 2), 1.0, 0.5, torch.ones(3))
    with pytest.raises(LoRAError, match="including a DoRA adapter is undefined"):
        merged_weight(torch.randn(3, 4), [t], torch.float32)


def test_config_flag_and_adapter_config():
    assert LoRAConfig(use_dora=True).to_peft_dict()["use_dora"] is True
    assert LoRAConfig.from_peft_dict({"use_dora": True, "r": 4}).use_dora is True
    with pytest.raises(LoRAError, match="use_dora must be true or false"):
        LoRAConfig(use_dora="yes")
    import train as train_cli
    cfg, _ = train_cli.build_config(train_cli.parse_args(["--use-dora"]))
    assert cfg.lora.use_dora
    cfg, _ = train_cli.build_config(train_cli.parse_args([]))
    assert not cfg.lora.use_dora


# -- a model: PEFT interop, merging --------------------------------------------------------------------
def _fresh():
    from test_adapter import fresh_model
    return fresh_model()


def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_peft_written_dora_adapter_gives_peft_logits_and_merge(tmp_path, token_ids):
    peft = pytest.importorskip("peft")
    pmodel = peft.get_peft_model(_fresh(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS,
                                                           rank_pattern={"up_proj": 6}))
    _randomize(pmodel)
    expected = pmodel(token_ids).logits
    pmodel.save_pretrained(tmp_path / "peft")
    ours = lora.load_adapter(_fresh(), tmp_path / "peft")
    assert all(layer.use_dora for layer in lora.lora_layers(ours).values())
    torch.testing.assert_close(ours(token_ids).logits, expected, rtol=1e-5, atol=1e-5)
    # merge_lora gives PEFT's merge_and_unload, weight for weight
    merged_peft = pmodel.merge_and_unload().state_dict()
    merged = lora.merge_lora(ours).state_dict()
    assert merged.keys() == merged_peft.keys()
    for k in merged:
        torch.testing.assert_close(merged[k], merged_peft[k], rtol=1e-6, atol=1e-6, msg=k)


def test_our_dora_adapter_loads_in_peft(tmp_path, token_ids):
    peft = pytest.importorskip("peft")
    model = lora.apply_lora(_fresh(), LoRAConfig(r=4, lora_alpha=7, use_dora=True, rank_pattern={"v_proj": 2}))
    _randomize(model)
    lora.save_adapter(model, tmp_path)
    pmodel = peft.PeftModel.from_pretrained(_fresh(), tmp_path)
    torch.testing.assert_close(pmodel(token_ids).logits, model(token_ids).logits, rtol=1e-5, atol=1e-5)
    # and back: the bytes round-trip
    again = lora.load_adapter(_fresh(), tmp_path)
    for (k, a), b in zip(lora.storage.adapter.adapter_state_dict(model).items(),
                         lora.storage.adapter.adapter_state_dict(again).values()):
        assert torch.equal(a, b), k


def test_streaming_merge_equals_peft_merge_and_unload(tmp_path, token_ids):
    peft = pytest.importorskip("peft")
    from test_merge import make_base, tensors
    base = make_base(tmp_path / "base")
    from transformers import AutoModelForCausalLM
    load = lambda: AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pmodel = peft.get_peft_model(load(), peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TARGETS))
    _randomize(pmodel)
    pmodel.save_pretrained(tmp_path / "adapter")
    want = {k: v for k, v in pmodel.merge_and_unload().state_dict().items()}
    report = lora.merge_checkpoint(base, tmp_path / "adapter", tmp_path / "merged", progress=False, verify=True)
    assert report.n_merged == 7 * json.loads((base / "config.json").read_text())["num_hidden_layers"]
    got = tensors(tmp_path / "merged")
    for k, v in got.items():
        torch.testing.assert_close(v, want[k], rtol=1e-6, atol=1e-6, msg=k)
    with pytest.raises(LoRAError, match="including a DoRA adapter is undefined"):
        lora.merge_checkpoint(base, [tmp_path / "adapter", tmp_path / "adapter"], tmp_path / "m2", progress=False)
    with pytest.raises(LoRAError, match="including a DoRA adapter is undefined"):
        lora.merge_checkpoint(base, tmp_path / "adapter", tmp_path / "m3", weights=[0.5], progress=False)


def test_nf4_base_dora_equals_dora_on_the_dequantized_base(token_ids):
    from lora.quant.linear import quantize_linears
    dense = _fresh()
    q = quantize_linears(_fresh(), skip={"lm_head"})
    dense_modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, qmod in q.named_modules():
            if isinstance(qmod, lora.quant.linear.NF4Linear):
                dense_modules[name].weight.copy_(qmod.weight.dequantize(torch.float32))
    for model in (dense, q):
        torch.manual_seed(5)
        lora.apply_lora(model, LoRAConfig(r=4, use_dora=True, init_lora_weights=False))
        _randomize(model)
    torch.testing.assert_close(q(token_ids).logits, dense(token_ids).logits, rtol=1e-5, atol=1e-5)
    q.train()
    q(token_ids, labels=token_ids).loss.backward()
    layer = q.model.layers[0].mlp.down_proj
    assert layer.lora_magnitude_vector.grad is not None and torch.isfinite(layer.lora_magnitude_vector.grad).all()


def test_loading_refuses_a_dora_config_without_magnitudes(tmp_path):
    model = lora.apply_lora(_fresh(), LoRAConfig(r=4, target_modules=["q_proj"]))
    lora.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(LoRAError, match="missing key.*lora_magnitude_vector"):
        lora.load_adapter(_fresh(), tmp_path)


def test_demo_learns_with_dora(tmp_path):
    """`python train.py --use-dora`: the demo's task learnt (held-out exact match >= 0.9), and the saved
    adapter is PEFT's DoRA format."""
    import train as train_cli
    out = tmp_path / "demo"
    assert train_cli.main(["--out", str(out), "--use-dora", "--no-progress"]) == 0
    ev = json.loads((out / "eval.json").read_text())
    assert ev["exact_match_before"] <= 0.1 and ev["exact_match"] >= 0.9
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    from lora.storage.adapter import read_adapter_tensors
    assert any(k.endswith(".lora_magnitude_vector") for k in read_adapter_tensors(out / "adapter"))
