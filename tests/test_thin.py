"""lora/core/thin.py: the adapter's thin products through oneDNN against float64, in every operand
layout the ops pass; torch.mm wherever oneDNN is not to be used; and the training ops' float64 and
bit-exact tests run again with every product sent through oneDNN."""
import pytest
import torch

import test_dora
import test_group
import test_layer
import test_recompute
from lora.core import thin

needs_onednn = pytest.mark.skipif(not thin._onednn_works(), reason="this PyTorch has no oneDNN linear")


@pytest.fixture
def calls(monkeypatch):
    """How many products went through oneDNN's linear."""
    count = [0]
    linear = thin._linear

    def counted(*args):
        count[0] += 1
        return linear(*args)
    monkeypatch.setattr(thin, "_linear", counted)
    return count


def close_to(got, ref):
    """‖got − ref‖ ≤ 4e-6 · ‖ref‖: fp32 products with reductions of about a thousand terms, against float64."""
    assert got.dtype == torch.float32 and got.shape == ref.shape
    err, size = (got.double() - ref).norm(), ref.norm()
    assert err <= 4e-6 * size, f"‖got − ref‖ = {err:.3g}, ‖ref‖ = {size:.3g}"


@needs_onednn
def test_every_product_of_the_op_matches_float64(calls):
    """Shapes that are no multiple of a block size; S_i a column block of S, and the transposed views
    the op passes (Aᵀ, Bᵀ, Sᵀ, dYᵀ, dSᵀ, xᵀ) read in place."""
    g = torch.Generator().manual_seed(3)
    M, n_in, n_out, r = 1031, 517, 1201, 13
    x, dY = torch.randn(M, n_in, generator=g), torch.randn(M, n_out, generator=g)
    A, B, b = torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g), torch.randn(n_out, generator=g)
    S_all = torch.randn(M, 2 * r + 3, generator=g)
    S = S_all[:, r + 3:]                                                  # (M, r), row stride 2r + 3
    dS = torch.randn(M, r, generator=g)
    d = lambda t: t.double()
    products = [
        (thin.mm(x, A.t()), d(x) @ d(A).t()),                             # shrink
        (thin.addmm(b, S, B.t()), d(b) + d(S) @ d(B).t()),                # expand with a bias
        (thin.addmm(None, S, B.t()), d(S) @ d(B).t()),                    # expand
        (thin.mm(dY, B), d(dY) @ d(B)),                                   # dS
        (thin.mm(S.t(), dY).t(), (d(S).t() @ d(dY)).t()),                 # dB = (Sᵀ dY)ᵀ
        (thin.mm(dS.t(), x), d(dS).t() @ d(x)),                           # dA
        (thin.mm(dS, A), d(dS) @ d(A)),                                   # dX's dS A
    ]
    assert calls[0] == len(products)
    for got, ref in products:
        close_to(got, ref)
    assert products[0][0].is_contiguous() and products[-1][0].is_contiguous()


def test_torch_mm_where_onednn_is_not_to_be_used(calls, monkeypatch):
    """Products under MIN_MACS, other dtypes, and thin GEMMs turned off: torch.mm's result bit for bit."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(9, 31, generator=g), torch.randn(31, 7, generator=g)
    assert 9 * 31 * 7 < thin.MIN_MACS
    assert torch.equal(thin.mm(a, b), torch.mm(a, b))
    assert torch.equal(thin.addmm(b[0], a, b), torch.addmm(b[0], a, b))
    big_a, big_b = torch.randn(700, 300, generator=g), torch.randn(300, 41, generator=g)
    assert 700 * 300 * 41 >= thin.MIN_MACS
    for dtype in (torch.float64, torch.bfloat16):
        assert torch.equal(thin.mm(big_a.to(dtype), big_b.to(dtype)), torch.mm(big_a.to(dtype), big_b.to(dtype)))
    thin.set_thin_gemm("torch")
    try:
        assert thin.get_thin_gemm() == "torch"
        assert torch.equal(thin.mm(big_a, big_b), torch.mm(big_a, big_b))
    finally:
        thin.set_thin_gemm("auto")
    assert calls[0] == 0
    with pytest.raises(ValueError, match="'auto' or 'torch'"):
        thin.set_thin_gemm("mkl")


def test_a_failing_check_leaves_every_product_on_torch_mm(monkeypatch):
    """oneDNN's linear raising, or giving another product, on the first-use check: torch.mm from then on."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(700, 300, generator=g), torch.randn(300, 41, generator=g)

    def raising(*args):
        raise RuntimeError("no oneDNN kernel for this CPU")
    for broken in (raising, lambda x, w, bias: torch.zeros(x.shape[0], w.shape[0])):
        monkeypatch.setattr(thin, "_WORKS", None)
        monkeypatch.setattr(thin, "_linear", broken)
        assert torch.equal(thin.mm(a, b), torch.mm(a, b)) and thin._WORKS is False


@needs_onednn
@pytest.mark.parametrize("test", [
    lambda: test_layer.test_forward_and_grads_match_float64_reference((3, 13, 45), True),
    lambda: test_layer.test_zero_B_is_the_base_layer_bit_for_bit(),
    lambda: test_group.test_grouped_function_matches_float64_reference_with_shared_mask(),
    lambda: test_recompute.test_norm_input_never_built_and_dA_matches_float64(0.2),
    lambda: test_dora.test_op_output_and_grads_against_float64(0.3, True, False),
    lambda: test_dora.test_op_output_and_grads_against_float64(0.0, False, True),
], ids=["layer", "zero-B", "group", "factored-dA", "dora-dropout", "dora"])
def test_the_ops_with_every_product_through_onednn(test, calls, monkeypatch):
    monkeypatch.setattr(thin, "MIN_MACS", 0)
    test()
    assert calls[0] > 0


@needs_onednn
def test_the_first_use_check_is_not_fooled_by_autocast(calls, monkeypatch):
    """A first product inside a bf16 autocast region: the check still compares fp32 with fp32."""
    monkeypatch.setattr(thin, "_WORKS", None)
    g = torch.Generator().manual_seed(6)
    a, b = torch.randn(700, 300, generator=g), torch.randn(300, 41, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        thin.mm(a, b)
    assert thin._WORKS is True and calls[0] == 2                     # the check's product, then this one
