"""The Triton DoRA path (kernels/dora.py) against a float64 reference.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before
`lora.kernels` is imported, as in tests/test_kernels.py); with a GPU the same tests run compiled.
The reference is PEFT's DoRA form written out in float64 autograd, with the weight norm n a constant
and dropout given as the kernels' own (M, in) multiplier (`dropout_mask`, the same seed):

    y = x Wᵀ + b + (g − 1) ⊙ (xd Wᵀ) + g ⊙ s·(xd Aᵀ) Bᵀ      g = m / n, xd = x ⊙ mask (x when p = 0)

Every buffer a launcher allocates for a kernel to fill (S, y, u, dS, dX, dA) is poisoned with NaN first.
"""

import pytest
import torch

from triton_interpreter import DEVICE, ON_GPU, poisoned_outputs  # noqa: E402,F401  (first: the interpreter)

import lora  # noqa: E402
import lora.kernels  # noqa: E402

from lora.kernels import dora_linear, dropout_mask, launch, lora_linear  # noqa: E402
from lora.kernels import dy_pass as dy_pass_mod, gemm as gemm_mod  # noqa: E402
from lora.kernels import grad_a as grad_a_mod, shrink as shrink_mod  # noqa: E402

# Tolerance: ROUNDINGS roundings of the output's dtype, relative to the largest reference value. The
# kernels round S, u, y, dY ⊙ g, dS (and with dropout xd, x − xd) to the input dtype once each.
ROUNDINGS = 8
UNIT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
TOL = {torch.float32: 1e-5, torch.float16: ROUNDINGS * UNIT[torch.float16],
       torch.bfloat16: ROUNDINGS * UNIT[torch.bfloat16]}
SCALING = 0.7
SEED = 987654321987


def make_inputs(x_shape, N, r, dtype, bias, m_dtype=torch.float32, seed=0):
    """O(1) base and LoRA terms; n = ‖W + s·B A‖_row of the cast weights (the caller's norm, detached);
    m = n · (1 + 0.3·noise), so g = m / n is far from 1 and differs per row."""
    g = torch.Generator().manual_seed(seed)
    K = x_shape[-1]
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    x = cast(torch.randn(*x_shape, generator=g))
    W = cast(torch.randn(N, K, generator=g) / K ** 0.5)
    b = cast(torch.randn(N, generator=g)) if bias else None
    A = cast(torch.randn(r, K, generator=g) / K ** 0.5)
    B = cast(torch.randn(N, r, generator=g) / r ** 0.5)
    dy = cast(torch.randn(*x_shape[:-1], N, generator=g))
    n = (W.double() + SCALING * B.double() @ A.double()).norm(dim=1).to(m_dtype)
    m = (n.double() * (1 + 0.3 * torch.randn(N, generator=g).to(DEVICE, torch.float64))).to(m_dtype)
    return x, W, b, A, B, m, n, dy


def reference(x, W, b, A, B, m, n, mask, dy):
    """y and (dX, dA, dB, dm) in float64 by autograd; n a constant, dropout the (M, in) multiplier `mask`."""
    K, N = x.shape[-1], W.shape[0]
    x64 = x.detach().double().reshape(-1, K).requires_grad_()
    A64, B64, m64 = (t.detach().double().requires_grad_() for t in (A, B, m))
    W64 = W.double()
    xd = x64 * mask.double() if mask is not None else x64
    g = m64 / n.double()
    y = x64 @ W64.t() + (g - 1) * (xd @ W64.t()) + g * (SCALING * (xd @ A64.t()) @ B64.t())
    if b is not None:
        y = y + b.double()
    y.backward(dy.double().reshape(-1, N))
    return y.detach().reshape(*x.shape[:-1], N), x64.grad.reshape(x.shape), A64.grad, B64.grad, m64.grad


def assert_near(got, ref, dtype):
    assert got.shape == ref.shape
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def run_dora(x, W, b, A, B, m, n, dy, p, seed=SEED, **kw):
    x, A, B, m = (t.detach().clone().requires_grad_() for t in (x, A, B, m))
    y = dora_linear(x, W, b, A, B, m, n, SCALING, p, seed=seed, **kw)
    y.backward(dy)
    return y.detach(), x.grad, A.grad, B.grad, m.grad


CASES = [  # (dtype, x shape, N, r, bias, dropout_p): in = 70 and out = 52 are multiples of no block size
    (torch.float32, (37, 70), 52, 5, True, 0.0),
    (torch.float32, (37, 70), 52, 5, False, 0.3),
    (torch.float32, (2, 11, 70), 52, 16, True, 0.1),
    (torch.float32, (37, 64), 64, 8, False, 0.2),      # in, out multiples of the K blocks: unmasked K loops
    (torch.float32, (1, 70), 52, 5, True, 0.0),        # decode: one row
    (torch.float32, (21, 70), 52, 200, True, 0.2),     # r > the dY pass's rank tile: dm added once
    (torch.bfloat16, (37, 70), 52, 5, True, 0.0),
    (torch.bfloat16, (37, 70), 52, 5, False, 0.3),
    (torch.bfloat16, (2, 11, 70), 52, 16, True, 0.1),
    (torch.float16, (37, 70), 52, 5, True, 0.2),
]


@pytest.mark.parametrize("dtype,x_shape,N,r,bias,p", CASES)
def test_forward_and_grads_match_float64(dtype, x_shape, N, r, bias, p, poisoned_outputs):
    m_dtype = torch.float16 if dtype == torch.float16 else torch.float32     # m in x's dtype, or fp32
    x, W, b, A, B, m, n, dy = make_inputs(x_shape, N, r, dtype, bias, m_dtype)
    y, dx, dA, dB, dm = run_dora(x, W, b, A, B, m, n, dy, p)
    M, K = x.numel() // x_shape[-1], x_shape[-1]
    mask = dropout_mask(M, K, p, SEED, DEVICE) if p > 0 else None
    y_ref, dx_ref, dA_ref, dB_ref, dm_ref = reference(x, W, b, A, B, m, n, mask, dy)
    assert (y.dtype, dx.dtype, dA.dtype, dB.dtype, dm.dtype) == (dtype,) * 4 + (m_dtype,)
    assert_near(y, y_ref, dtype)
    assert_near(dx, dx_ref, dtype)
    assert_near(dA, dA_ref, dtype)
    assert_near(dB, dB_ref, dtype)
    assert_near(dm, dm_ref, dtype)
    assert len(poisoned_outputs) >= 6       # S, y, u, dS, dX, dA all came from the poisoned allocator


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_magnitude_one_and_zero_adapter_is_the_base(p):
    """m = n exactly and B = 0 ⇒ g = 1 and the LoRA term is 0: y is the base output. Without dropout
    it is the LoRA kernel's output with B = 0, bit for bit (the same GEMM, times 1.0 in the epilogue);
    with dropout it is x Wᵀ + b summed as xd Wᵀ + (x − xd) Wᵀ, equal to float64 within fp32 tolerance."""
    x, W, b, A, B, _, _, dy = make_inputs((37, 70), 52, 5, torch.float32, True, seed=3)
    B = torch.zeros_like(B)
    n = W.norm(dim=1)                          # ‖W + s·B A‖_row with B = 0
    y, *_ = run_dora(x, W, b, A, B, n.clone(), n, dy, p)
    base64 = x.double() @ W.double().t() + b.double()
    assert_near(y, base64, torch.float32)
    if p == 0:
        assert torch.equal(y, lora_linear(x, W, b, A, B, SCALING))


def test_only_the_requested_grads():
    """Only m trainable (A, B frozen, x without grad), then m frozen: each path alone is right, and u
    is kept only when m needs its gradient."""
    x, W, b, A, B, m, n, dy = make_inputs((37, 70), 52, 5, torch.float32, True, seed=1)
    mask = dropout_mask(37, 70, 0.2, 5, DEVICE)
    _, dx_ref, dA_ref, dB_ref, dm_ref = reference(x, W, b, A, B, m, n, mask, dy)

    m1 = m.clone().requires_grad_()
    y = dora_linear(x, W, b, A, B, m1, n, SCALING, 0.2, seed=5)
    assert y.grad_fn.saved_tensors[-1] is not None          # u
    y.backward(dy)
    assert_near(m1.grad, dm_ref, torch.float32)

    x2, A2, B2 = (t.clone().requires_grad_() for t in (x, A, B))
    y = dora_linear(x2, W, b, A2, B2, m, n, SCALING, 0.2, seed=5)
    assert y.grad_fn.saved_tensors[-1] is None              # m frozen: no u
    y.backward(dy)
    assert_near(x2.grad, dx_ref, torch.float32)
    assert_near(A2.grad, dA_ref, torch.float32)
    assert_near(B2.grad, dB_ref, torch.float32)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_product_input_rebuilt_bit_for_bit(p):
    """x = act(g) ⊙ u (down_proj's input): not saved but multiplied again in backward; every gradient
    equals the op that saves x, bit for bit."""
    torch.manual_seed(2)
    gate = torch.randn(2, 19, 70, device=DEVICE, requires_grad=True)
    up = torch.randn(2, 19, 70, device=DEVICE, requires_grad=True)
    _, W, _, A0, B0, m0, n, dy = make_inputs((2, 19, 70), 52, 5, torch.float32, False, seed=4)
    res = []
    for rebuild in (True, False):
        A, B, m = (t.clone().requires_grad_() for t in (A0, B0, m0))
        y = dora_linear(torch.nn.functional.silu(gate) * up, W, None, A, B, m, n, SCALING, p, seed=7,
                        recompute_input=rebuild)
        assert (y.grad_fn.saved_tensors[0] is None) == rebuild
        y.backward(dy)
        res.append((y.detach(), A.grad, B.grad, m.grad, gate.grad.clone(), up.grad.clone()))
        gate.grad = up.grad = None
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_bad_inputs_raise_lora_error():
    x, W, b, A, B, m, n, _ = make_inputs((5, 70), 52, 5, torch.float32, True)
    with pytest.raises(lora.LoRAError, match=r"magnitude must have shape \(52,\)"):
        dora_linear(x, W, b, A, B, m[:-1], n, SCALING)
    with pytest.raises(lora.LoRAError, match=r"weight_norm must have shape \(52,\)"):
        dora_linear(x, W, b, A, B, m, n[None], SCALING)
    with pytest.raises(lora.LoRAError, match="weight norm as a constant"):
        dora_linear(x, W, b, A, B, m, n.clone().requires_grad_(), SCALING)
    with pytest.raises(lora.LoRAError, match="shapes do not chain"):
        dora_linear(x, W, b, A.t(), B, m, n, SCALING)


def test_empty_batch():
    x, W, b, A, B, m, n, _ = make_inputs((0, 70), 52, 5, torch.float32, True)
    m.requires_grad_()
    y = dora_linear(x, W, b, A, B, m, n, SCALING, 0.1)
    assert y.shape == (0, 52)
    y.sum().backward()
    assert torch.equal(m.grad, torch.zeros_like(m))


@pytest.mark.skipif(ON_GPU, reason="on a GPU the autotuned path runs for real in every test")
def test_gpu_launch_path_under_interpreter(monkeypatch):
    """The autotuned launch, every config interpreted (timings faked): the DoRA flags tune apart from
    LoRA's and the dm buffer (fp32 atomics) is zeroed before each timed config."""
    import itertools
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "check_device", lambda *t: None)
    ticks = itertools.count()

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        t = 1000.0 - next(ticks)
        return [t, t, t]

    tuned = [shrink_mod._shrink_tuned, gemm_mod._gemm_tuned, dy_pass_mod._dy_pass_tuned, grad_a_mod._grad_a_tuned]
    for t in tuned:
        monkeypatch.setitem(t.__dict__, "do_bench", fake_bench)
        monkeypatch.setattr(t, "cache", {})
    x, W, b, A, B, m, n, dy = make_inputs((5, 70), 52, 5, torch.float32, True, seed=8)
    y, dx, dA, dB, dm = run_dora(x, W, b, A, B, m, n, dy, 0.2, seed=9)
    refs = reference(x, W, b, A, B, m, n, dropout_mask(5, 70, 0.2, 9, DEVICE), dy)
    for got, want in zip((y, dx, dA, dB, dm), refs):
        assert_near(got, want, torch.float32)
    assert next(ticks) > 8
    assert all(t.cache for t in tuned)
