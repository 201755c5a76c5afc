"""The LoRA input rebuilt in backward from what autograd keeps (lora/core/recompute.py): bit for bit, only
where the pattern holds, and every gradient unchanged."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lora
import lora.core.dropout
import lora.core.op
from lora import LoRAConfig
from lora.core.op import lora_linear_torch
from lora.core.recompute import product_recipe, recompute, split_product
from test_inject import randomize_B


def rms_norm(h, w, eps=1e-6):          # Llama's RMSNorm, op for op
    h = h.to(torch.float32)
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))


def test_recipes_rebuild_norm_and_gated_products_bit_for_bit():
    torch.manual_seed(0)
    h = torch.randn(3, 7, 33, requires_grad=True)
    w = torch.randn(33)                                   # frozen: the multiply keeps only w, not h·rsqrt
    x = rms_norm(h * 1.5, w)
    recipe = product_recipe(x)
    assert recipe is not None and recipe[1] is None and recipe[2] is not None      # w saved, right side rebuilt
    assert torch.equal(recompute(recipe, x.shape, x.dtype), x)
    g, u = torch.randn(2, 9, 71, requires_grad=True), torch.randn(2, 9, 71, requires_grad=True)
    x = F.silu(g) * u                                     # Llama's MLP input to down_proj
    recipe = product_recipe(x)
    assert recipe[1:] == (None, None)                     # both factors saved by the multiply
    assert torch.equal(recompute(recipe, x.shape, x.dtype), x)
    y = x * 2.5                                           # a scalar factor: x is rebuilt first
    assert torch.equal(recompute(product_recipe(y), y.shape, y.dtype), y)
    z = x.clone()
    z.mul_(u)                                             # in place: the multiply kept z's old value
    assert torch.equal(recompute(product_recipe(z), z.shape, z.dtype), z)


def test_no_recipe_where_the_pattern_does_not_hold():
    a, b = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    x = a * b
    assert product_recipe(x.transpose(0, 1).reshape(4, 6)) is None      # o_proj's input: a copy of a view
    assert product_recipe(x.view(2, 12)) is None                        # a view of the product
    assert product_recipe(x.double()) is None                           # a cast
    assert product_recipe(x + 1) is None
    assert product_recipe(a) is None and product_recipe(a.detach() * b.detach()) is None
    w = torch.randn(6)
    assert product_recipe(w * (a + b)) is None           # the unsaved factor is not itself a product
    x2 = x.clone()
    x2.add_(1)                                           # changed in place after the multiply
    assert product_recipe(x2) is None
    with pytest.raises(RuntimeError, match="recomputed LoRA input"):
        recompute(product_recipe(x), torch.Size([4, 7]), x.dtype)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_norm_input_never_built_and_dA_matches_float64(p):
    """RMSNorm's output x = rsqrt ⊙ h ⊙ w: dA comes from ((dS ⊙ rsqrt)ᵀ h) ⊙ w, and backward multiplies
    nothing of x's size."""
    from torch.utils._python_dispatch import TorchDispatchMode
    torch.manual_seed(7)
    h = torch.randn(3, 11, 37, requires_grad=True)
    w = torch.randn(37)
    W, b = torch.randn(23, 37), torch.randn(23)
    A, B = (torch.randn(5, 37) * 0.3).requires_grad_(), (torch.randn(23, 5) * 0.3).requires_grad_()
    x = rms_norm(h, w)
    recipe = product_recipe(x)
    row, full, col = split_product(recipe, x.shape, x.dtype)
    assert row.shape == (33, 1) and full.shape == (33, 37) and col.shape == (37,)
    assert split_product(product_recipe(F.silu(h) * h), h.shape, h.dtype) is None     # two full factors
    y = lora_linear_torch(x, W, b, A, B, 0.6, p, seed=11)
    dy = torch.randn_like(y)

    class Muls(TorchDispatchMode):
        sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mul, torch.ops.aten.mul_) and isinstance(out, torch.Tensor):
                self.sizes.append(out.numel())
            return out
    with Muls():
        dA, dB, dh = torch.autograd.grad(y, (A, B, h), dy)
    assert x.numel() not in Muls.sizes[:3]              # ours runs first: scales on (M, 5) and (5, 37) only
    # float64 reference with the same dropout mask
    mask = lora.core.dropout.dropout_scale(x, p, 11) if p else torch.ones_like(x)
    h64, w64 = h.detach().double().requires_grad_(), w.double()
    A64, B64 = A.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    x64 = rms_norm(h64, w64)
    y64 = x64 @ W.double().t() + b.double() + 0.6 * ((x64 * mask.double()) @ A64.t()) @ B64.t()
    rA, rB, rh = torch.autograd.grad(y64, (A64, B64, h64), dy.double())
    for got, ref in ((dA, rA), (dB, rB), (dh, rh)):
        torch.testing.assert_close(got.double(), ref, rtol=0, atol=2e-6 * ref.abs().max().item())


def _saved(y):
    """What the op saved in place of x: the first saved tensor of y's node."""
    return y.grad_fn.saved_tensors[0]


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_op_saves_no_input_and_matches_the_saving_op_bit_for_bit(p):
    torch.manual_seed(1)
    g, u = torch.randn(5, 13, 71, requires_grad=True), torch.randn(5, 13, 71, requires_grad=True)
    W, b = torch.randn(29, 71), torch.randn(29)
    grads, outs = [], []
    for rebuild in (True, False):
        A = (torch.randn(6, 71, generator=torch.Generator().manual_seed(2)) * 0.1).requires_grad_()
        B = (torch.randn(29, 6, generator=torch.Generator().manual_seed(3)) * 0.1).requires_grad_()
        x = F.silu(g) * u
        y = lora_linear_torch(x, W, b, A, B, 0.7, p, seed=99, recompute_input=rebuild)
        assert (_saved(y) is None) == rebuild
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        grads.append((A.grad, B.grad, g.grad.clone(), u.grad.clone()))
        outs.append(y.detach())
        g.grad = u.grad = None
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("grouped", [True, False])
def test_llama_grads_equal_with_and_without_rebuilding(tiny_llama, token_ids, monkeypatch, p, grouped):
    cfg = LoRAConfig(r=4, lora_dropout=p)
    saving = lora.apply_lora(copy.deepcopy(tiny_llama), cfg, group_shared_inputs=grouped)
    rebuilding = lora.apply_lora(tiny_llama, cfg, group_shared_inputs=grouped)
    randomize_B(saving)
    rebuilding.load_state_dict(saving.state_dict())
    found = []
    real = lora.core.op.product_recipe
    monkeypatch.setattr(lora.core.op, "product_recipe", lambda x: found.append(real(x)) or found[-1])
    grads = {}
    for name, model in (("rebuilding", rebuilding), ("saving", saving)):
        lora.set_recompute_inputs(name == "rebuilding")
        model.train()
        emb = model.get_input_embeddings()(token_ids).detach().requires_grad_()
        torch.manual_seed(5)                             # the same dropout seeds for both
        model(inputs_embeds=emb, labels=token_ids).loss.backward()
        grads[name] = {n: t.grad for n, t in model.named_parameters() if t.requires_grad} | {"emb": emb.grad}
    lora.set_recompute_inputs(True)
    # Per layer: q/k/v and gate/up read RMSNorm's output, down reads act(g) ⊙ u; o_proj reads a copy.
    per_layer = 3 if grouped else 6
    assert sum(r is not None for r in found) == 3 * per_layer and len(found) == 3 * (per_layer + 1)
    for n, t in grads["saving"].items():
        if n.endswith("lora_A") and "o_proj" not in n and "down_proj" not in n:
            # RMSNorm's output is never built (split_product): the same sum in another order
            torch.testing.assert_close(grads["rebuilding"][n], t, rtol=0, atol=1e-6 * t.abs().max().item())
        else:
            assert torch.equal(grads["rebuilding"][n], t), n


@pytest.mark.parametrize("reentrant", [False, True])
def test_rebuilding_under_checkpointing(tiny_llama, token_ids, reentrant):
    """Non-reentrant checkpointing (HF's default, train.py's) saves through hooks, so no recipe is
    taken; reentrant checkpointing recomputes the block with grads on and no hooks, so recipes are.
    Either way the grads match a run without checkpointing."""
    cfg = LoRAConfig(r=4)
    plain = lora.apply_lora(copy.deepcopy(tiny_llama), cfg)
    randomize_B(plain)
    ckpt = copy.deepcopy(plain)
    ckpt.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    for m in (plain, ckpt):
        m.train()
        emb = m.get_input_embeddings()(token_ids).detach().requires_grad_()
        m(inputs_embeds=emb, labels=token_ids).loss.backward()
    gp = dict(plain.named_parameters())
    for n, t in ckpt.named_parameters():
        if t.requires_grad:
            torch.testing.assert_close(t.grad, gp[n].grad, rtol=1e-5, atol=1e-7, msg=n)
    # and a hand-made checkpoint around the product and the op
    g, u = torch.randn(4, 19, requires_grad=True), torch.randn(4, 19, requires_grad=True)
    A, B = torch.randn(3, 19, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    W = torch.randn(5, 19)
    f = lambda g, u: lora_linear_torch(F.silu(g) * u, W, None, A, B, 2.0)
    checkpoint(f, g, u, use_reentrant=reentrant).sum().backward()
    ref = [t.grad.clone() for t in (g, u, A, B)]
    for t in (g, u, A, B):
        t.grad = None
    f(g, u).sum().backward()
    for r, t in zip(ref, (g, u, A, B)):
        torch.testing.assert_close(t.grad, r)


def test_no_recipe_for_factors_saved_through_hooks():
    a, b = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        x = a * b
        n = rms_norm(a, torch.randn(6))
    assert product_recipe(x) is None and product_recipe(n) is None
    assert product_recipe(a * b) is not None


def test_switch_and_graph_safe_mode_keep_the_input(tiny_llama, token_ids):
    """`set_recompute_inputs(False)`, and graph-safe mode (HPU graphs, torch.compile), never look at
    the autograd graph: every LoRA op keeps its input."""
    from lora.core import backend
    model = lora.apply_lora(tiny_llama, LoRAConfig(r=4))
    model.train()
    layer = model.model.layers[1].mlp.down_proj

    def saved_input():
        seen = {}
        hook = layer.register_forward_hook(lambda m, i, o: seen.setdefault("y", o))
        model(token_ids)
        hook.remove()
        return seen["y"].grad_fn.saved_tensors[0]

    assert lora.get_recompute_inputs() and saved_input() is None
    try:
        lora.set_recompute_inputs(False)
        assert saved_input() is not None
        lora.set_recompute_inputs(True)
        backend.set_graph_safe(True)
        assert saved_input() is not None
    finally:
        backend.set_graph_safe(False)
        lora.set_recompute_inputs(True)
