"""The fused Triton LoRA kernels against a float64 reference.

Without a GPU the kernels run on CPU tensors under Triton's interpreter: TRITON_INTERPRET=1 has to be
set before `lora.kernels` is imported (triton.jit decides at decoration time), so tests/triton_interpreter.py
(imported first) sets it. With a GPU the same tests run compiled on CUDA.

Every buffer a launcher allocates for a kernel to fill is poisoned with NaN (autouse fixture), so an
element a kernel forgets to write fails the comparison.
"""
import os
import sys

import pytest
import torch

from triton_interpreter import DEVICE, ON_GPU, poisoned_outputs  # noqa: E402,F401  (first: the interpreter)

import lora  # noqa: E402
import lora.kernels  # noqa: E402

from lora.kernels import dropout_mask, launch, lora_linear  # noqa: E402
from lora.kernels import dy_pass as dy_pass_mod, gemm as gemm_mod, grad_a as grad_a_mod  # noqa: E402
from lora.kernels import shrink as shrink_mod  # noqa: E402
from lora.kernels.grad_a import grad_a  # noqa: E402
from lora.kernels.shrink import shrink  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def make_inputs(x_shape, N, r, dtype, bias, seed=0):
    """O(1) base and LoRA terms, so an error in either shows above the tolerance."""
    g = torch.Generator().manual_seed(seed)
    K = x_shape[-1]
    x = torch.randn(*x_shape, generator=g)
    W = torch.randn(N, K, generator=g) / K ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    A = torch.randn(r, K, generator=g) / K ** 0.5
    B = torch.randn(N, r, generator=g) / r ** 0.5
    dy = torch.randn(*x_shape[:-1], N, generator=g)
    cast = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return cast(x), cast(W), cast(b), cast(A), cast(B), cast(dy)


def reference(x, W, b, A, B, scaling, mask, dy):
    """y and (dX, dA, dB) in float64 by autograd, dropout given as the (M, K) multiplier `mask`."""
    K, N = x.shape[-1], W.shape[0]
    x64 = x.detach().double().reshape(-1, K).requires_grad_()
    A64 = A.detach().double().requires_grad_()
    B64 = B.detach().double().requires_grad_()
    xd = x64 * mask.double() if mask is not None else x64
    y = x64 @ W.double().t() + scaling * (xd @ A64.t()) @ B64.t()
    if b is not None:
        y = y + b.double()
    y.backward(dy.double().reshape(-1, N))
    return y.detach().reshape(*x.shape[:-1], N), x64.grad.reshape(x.shape), A64.grad, B64.grad


def assert_near(got, ref, dtype):
    assert got.shape == ref.shape
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


CASES = [  # (dtype, x shape, N, r, bias, dropout_p): K = 45 and N = 29 are multiples of no block size
    (torch.float32, (37, 45), 29, 1, True, 0.0),
    (torch.float32, (37, 45), 29, 8, False, 0.25),
    (torch.float32, (3, 13, 45), 29, 16, True, 0.1),
    (torch.float32, (37, 64), 32, 64, False, 0.0),      # K a multiple of BLOCK_K: the unmasked K loop
    (torch.float32, (1, 45), 29, 8, True, 0.0),         # decode: one row
    (torch.float32, (21, 45), 29, 200, True, 0.5),      # r > the rank tile: several rank blocks
    (torch.bfloat16, (37, 45), 29, 1, False, 0.1),
    (torch.bfloat16, (2, 19, 45), 29, 8, True, 0.0),
    (torch.bfloat16, (37, 45), 29, 16, False, 0.25),
    (torch.bfloat16, (37, 45), 29, 64, True, 0.1),
    (torch.float16, (2, 19, 45), 29, 16, True, 0.1),
]


@pytest.mark.parametrize("dtype,x_shape,N,r,bias,p", CASES)
def test_forward_and_grads_match_float64(dtype, x_shape, N, r, bias, p, poisoned_outputs):
    x, W, b, A, B, dy = make_inputs(x_shape, N, r, dtype, bias)
    x.requires_grad_(), A.requires_grad_(), B.requires_grad_()
    seed = 987654321987
    y = lora_linear(x, W, b, A, B, 0.7, p, seed=seed)
    y.backward(dy)
    M, K = x.numel() // x_shape[-1], x_shape[-1]
    mask = dropout_mask(M, K, p, seed, DEVICE) if p > 0 else None
    y_ref, dx_ref, dA_ref, dB_ref = reference(x, W, b, A, B, 0.7, mask, dy)
    assert y.dtype == dtype and x.grad.dtype == dtype and A.grad.dtype == dtype and B.grad.dtype == dtype
    assert_near(y.detach(), y_ref, dtype)
    assert_near(x.grad, dx_ref, dtype)
    assert_near(A.grad, dA_ref, dtype)
    assert_near(B.grad, dB_ref, dtype)
    assert len(poisoned_outputs) >= 5       # S, y, dS, dX, dA all came from the poisoned allocator


def test_only_the_requested_grads():
    """First layer (x needs no grad) and frozen adapter (only x): each path alone is still right."""
    x, W, b, A, B, dy = make_inputs((37, 45), 29, 8, torch.float32, True, seed=1)
    A.requires_grad_(), B.requires_grad_()
    lora_linear(x, W, b, A, B, 0.5, 0.2, seed=5).backward(dy)
    mask = dropout_mask(37, 45, 0.2, 5, DEVICE)
    _, dx_ref, dA_ref, dB_ref = reference(x, W, b, A, B, 0.5, mask, dy)
    assert x.grad is None
    assert_near(A.grad, dA_ref, torch.float32)
    assert_near(B.grad, dB_ref, torch.float32)

    x2 = x.clone().requires_grad_()
    lora_linear(x2, W, b, A.detach(), B.detach(), 0.5, 0.2, seed=5).backward(dy)
    assert_near(x2.grad, dx_ref, torch.float32)


def test_split_reductions_match():
    """The split-K shrink and split-M dA (used at small M / few columns on a GPU) sum fp32 partials."""
    x, _, _, A, _, _ = make_inputs((37, 45), 29, 16, torch.float32, False, seed=2)
    ds = torch.randn(37, 16, device=DEVICE)
    mask = dropout_mask(37, 45, 0.3, 11, DEVICE).double()
    xd = x.double() * mask
    for split in (1, 3):
        assert_near(shrink(x, A, 0.3, 11, split_k=split), xd @ A.double().t(), torch.float32)
        assert_near(grad_a(ds, x, 0.3, 11, split_m=split), ds.double().t() @ xd, torch.float32)


def test_dropout_mask_is_seeded_philox():
    p = 0.3
    m = dropout_mask(128, 100, p, 42, DEVICE)
    assert m.unique().tolist() == [0.0, pytest.approx(1 / (1 - p))]
    keep = (m > 0).double().mean().item()
    assert abs(keep - (1 - p)) < 4 * ((p * (1 - p)) / m.numel()) ** 0.5      # 4 sigma
    assert torch.equal(m, dropout_mask(128, 100, p, 42, DEVICE))
    assert not torch.equal(m, dropout_mask(128, 100, p, 43, DEVICE))
    # keyed on the logical offset m·K + k: a sub-block of rows regenerates the same values
    assert torch.equal(m[:50], dropout_mask(50, 100, p, 42, DEVICE))


def test_dropout_seed_from_torch_generator():
    x, W, b, A, B, _ = make_inputs((16, 45), 29, 8, torch.float32, False, seed=3)
    torch.manual_seed(7)
    y1 = lora_linear(x, W, b, A, B, 1.0, 0.5)
    torch.manual_seed(7)
    y2 = lora_linear(x, W, b, A, B, 1.0, 0.5)
    y3 = lora_linear(x, W, b, A, B, 1.0, 0.5)
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, y3)


def test_non_contiguous_inputs():
    """x through strides (a view) or a copy (when no view exists); dY expanded (stride 0) by sum()."""
    x, W, b, A, B, _ = make_inputs((2, 19, 45), 29, 8, torch.float32, True, seed=4)
    ones = torch.ones(2, 19, 29, device=DEVICE)                 # the dY that y.sum().backward() expands
    y_ref, dx_ref, dA_ref, dB_ref = reference(x, W, b, A, B, 0.7, None, ones)
    wide = torch.zeros(2, 19, 90, device=DEVICE)
    wide[..., ::2] = x
    strided = wide[..., ::2]                                    # stride 2 along K: reshape is a view
    transposed = x.transpose(0, 1).contiguous().transpose(0, 1)  # (2, 19, 45), no (38, 45) view exists
    for xin in (strided, transposed):
        assert not xin.is_contiguous()
        xin = xin.detach().requires_grad_()
        A_, B_ = A.clone().requires_grad_(), B.clone().requires_grad_()
        y = lora_linear(xin, W, b, A_, B_, 0.7, 0.0)
        y.sum().backward()
        assert_near(y.detach(), y_ref, torch.float32)
        assert_near(xin.grad, dx_ref, torch.float32)
        assert_near(A_.grad, dA_ref, torch.float32)
        assert_near(B_.grad, dB_ref, torch.float32)


def test_bad_inputs_raise_lora_error():
    x, W, b, A, B, _ = make_inputs((4, 45), 29, 8, torch.float32, True)
    with pytest.raises(lora.LoRAError, match="dtype"):
        lora_linear(x, W.to(torch.bfloat16), b, A, B, 1.0, 0.0)
    with pytest.raises(lora.LoRAError, match="ranks 1..256"):
        lora_linear(x, W, b, torch.zeros(257, 45, device=DEVICE), torch.zeros(29, 257, device=DEVICE), 1.0)
    with pytest.raises(lora.LoRAError, match="do not chain"):
        lora_linear(x, W, b, A[:, :40], B, 1.0)
    with pytest.raises(lora.LoRAError, match="frozen"):
        lora_linear(x, W.clone().requires_grad_(), b, A, B, 1.0)
    with pytest.raises(lora.LoRAError, match="dropout_p"):
        lora_linear(x, W, b, A, B, 1.0, 1.0)
    with pytest.raises(lora.LoRAError, match="supports float32"):
        lora_linear(x.double(), W.double(), b, A.double(), B.double(), 1.0)


def test_empty_batch():
    x, W, b, A, B, _ = make_inputs((0, 45), 29, 8, torch.float32, True)
    assert lora_linear(x, W, b, A, B, 1.0).shape == (0, 29)


@pytest.mark.skipif(ON_GPU, reason="checks the interpreter's single-config path")
def test_interpreter_runs_one_config_without_autotuning(monkeypatch):
    assert launch.INTERPRET

    def refuse(*args, **kwargs):
        raise AssertionError("autotuner launched under the interpreter")

    for mod, name in ((shrink_mod, "_shrink_tuned"), (gemm_mod, "_gemm_tuned"),
                      (dy_pass_mod, "_dy_pass_tuned"), (grad_a_mod, "_grad_a_tuned")):
        monkeypatch.setattr(getattr(mod, name), "run", refuse)
    x, W, b, A, B, dy = make_inputs((20, 45), 29, 8, torch.float32, True, seed=6)
    A.requires_grad_()
    lora_linear(x.requires_grad_(), W, b, A, B, 1.0, 0.1, seed=3).backward(dy)
    assert A.grad is not None and x.grad is not None


@pytest.mark.skipif(ON_GPU, reason="on a GPU the autotuned path runs for real in every test")
@pytest.mark.parametrize("M,autotune", [(5, True), (37, True), (37, False)])
def test_gpu_launch_paths_under_interpreter(monkeypatch, M, autotune):
    """The GPU launch paths run here too, each config interpreted: with autotuning (bucket pruning,
    heuristics, config-dependent grids, dB zeroed between timed configs; timings faked) and with
    LORA_KERNELS_AUTOTUNE=0 (each bucket's first config, the autotuner never called)."""
    import itertools
    monkeypatch.setattr(launch, "INTERPRET", False)             # launchers take the GPU branches
    monkeypatch.setattr(launch, "AUTOTUNE", autotune)
    monkeypatch.setattr(launch, "check_device", lambda *t: None)
    ticks = itertools.count()

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        t = 1000.0 - next(ticks)            # later configs look faster: the winner is not the first
        return [t, t, t]

    def refuse(*args, **kwargs):
        raise AssertionError("autotuner called with LORA_KERNELS_AUTOTUNE=0")

    tuned = [shrink_mod._shrink_tuned, gemm_mod._gemm_tuned, dy_pass_mod._dy_pass_tuned, grad_a_mod._grad_a_tuned]
    for t in tuned:
        monkeypatch.setitem(t.__dict__, "do_bench", fake_bench)      # shadows the cached_property
        monkeypatch.setattr(t, "cache", {})
        if not autotune:
            monkeypatch.setattr(t, "run", refuse)
    x, W, b, A, B, dy = make_inputs((M, 45), 29, 8, torch.float32, True, seed=8)
    x.requires_grad_(), A.requires_grad_(), B.requires_grad_()
    y = lora_linear(x, W, b, A, B, 0.7, 0.2, seed=9)
    y.backward(dy)
    y_ref, dx_ref, dA_ref, dB_ref = reference(x, W, b, A, B, 0.7, dropout_mask(M, 45, 0.2, 9, DEVICE), dy)
    assert_near(y.detach(), y_ref, torch.float32)
    assert_near(x.grad, dx_ref, torch.float32)
    assert_near(A.grad, dA_ref, torch.float32)
    assert_near(B.grad, dB_ref, torch.float32)   # atomics: wrong unless dB is zeroed before each config
    if autotune:
        assert next(ticks) > 8                    # several configs were timed
        assert all(t.cache for t in tuned), "autotuner never ran"


def test_autotune_buckets_keep_their_own_configs():
    assert [launch.m_bucket(m) for m in (1, 16, 17, 64, 65, 256, 257, 512, 8192)] == \
        [16, 16, 64, 64, 256, 256, 512, 512, 512]
    for mod in (shrink_mod, gemm_mod, dy_pass_mod, grad_a_mod):
        configs = launch.configs_from(mod._TABLE, mod._NAMES)
        prune = launch.bucket_pruner(mod._TABLE, mod._NAMES)
        for bucket, rows in mod._TABLE.items():
            kept = prune(configs, {"M_BUCKET": bucket})
            assert sorted(tuple(c.kwargs[n] for n in mod._NAMES) + (c.num_stages, c.num_warps)
                          for c in kept) == sorted(set(rows))
        assert all(c.kwargs["BLOCK_M"] <= 16 for c in prune(configs, {"M_BUCKET": 16}))


def test_lora_linear_layer_triton_backend_matches_plain_path():
    """LoRALinear through lora.set_backend('triton') equals the plain PyTorch op (dropout 0: the two
    paths draw different masks)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(45, 29).to(DEVICE)
    layer = lora.LoRALinear(base, r=8, alpha=16, dropout=0.0, init_lora_weights=False)
    x = torch.randn(3, 7, 45, device=DEVICE)
    outs = {}
    old = lora.get_backend()
    try:
        for name in ("torch", "triton"):
            lora.set_backend(name)
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            y = layer(xi)
            (y * torch.arange(29, device=DEVICE)).sum().backward()
            outs[name] = (y.detach(), xi.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    finally:
        lora.set_backend(old)
    for got, want in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_triton_op_rebuilds_a_product_input_bit_for_bit(p):
    """x = act(g) ⊙ u (down_proj's input): the op saves no x and multiplies it again in backward;
    every gradient equals the op that saves x, bit for bit (the same kernels on the same values)."""
    torch.manual_seed(2)
    g = torch.randn(2, 37, 45, device=DEVICE, requires_grad=True)
    u = torch.randn(2, 37, 45, device=DEVICE, requires_grad=True)
    W = torch.randn(29, 45, device=DEVICE)
    A0, B0 = torch.randn(8, 45, device=DEVICE) * 0.2, torch.randn(29, 8, device=DEVICE) * 0.2
    res = []
    for rebuild in (True, False):
        A, B = A0.clone().requires_grad_(), B0.clone().requires_grad_()
        y = lora_linear(torch.nn.functional.silu(g) * u, W, None, A, B, 2.0, p, seed=7, recompute_input=rebuild)
        assert (y.grad_fn.saved_tensors[0] is None) == rebuild
        y.backward(torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y))
        res.append((y.detach(), A.grad, B.grad, g.grad.clone(), u.grad.clone()))
        g.grad = u.grad = None
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_package_contract():
    from lora.core import backend
    assert lora.kernels.AVAILABLE is True
    assert not hasattr(lora.kernels, "__version__")
    assert backend._triton_available() is True          # what backend "auto" asks on CUDA


def test_bench_quick_writes_records(tmp_path):
    """bench/bench_kernels.py --quick (CPU, plain-PyTorch providers) runs and writes the record schema."""
    import json
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "q.json"
    cmd = [sys.executable, str(root / "bench" / "bench_kernels.py"), "--quick", "--shapes", "k_proj",
           "--M", "1,16", "--r", "8", "--reps", "2", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    records = json.loads(out.read_text())
    assert len(records) == 2 * 3
    for rec in records:
        assert tuple(rec) == ("device", "shape_name", "M", "N", "K", "r", "dtype", "provider", "fwd_ms",
                              "fwd_bwd_ms")
        assert rec["device"] == "cpu" and rec["shape_name"] == "k_proj" and (rec["K"], rec["N"]) == (512, 128)
        assert rec["fwd_ms"] > 0 and rec["fwd_bwd_ms"] > 0
    assert {rec["provider"] for rec in records} == {"base", "peft_style", "torch_op"}
    assert "| k_proj | 16 |" in out.with_suffix(".md").read_text()
    bad = subprocess.run(cmd[:2] + ["--quick", "--shapes", "nope"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --shapes") and "Traceback" not in bad.stderr


def test_kernels_compile_for_h100():
    """The interpreter never runs Triton's compiler: lower every kernel to an sm_90 cubin (no GPU needed)."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "lora.kernels.compile_check", "90", "bf16"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("shrink", "gemm", "dy_pass", "grad_a", "dropout_mask"):
        assert f"{name}: sm_90 bf16 cubin" in r.stdout


# -- NF4 (lora/quant/nf4.py): the dequantize kernel and the decode-size fused dequantize-and-multiply --

NF4_SHAPES = [(29, 45), (37, 131), (7, 9), (300, 70), (1, 1)]     # ragged 64-blocks, odd element counts


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_dequantize_kernel_is_bit_exact(dtype, double_quant, poisoned_outputs):
    from lora.kernels import nf4_dequantize
    for shape in NF4_SHAPES:
        q = lora.quantize_nf4(torch.randn(shape).to(dtype), double_quant=double_quant).to(DEVICE)
        assert torch.equal(nf4_dequantize(q), q.dequantize()), shape
        assert torch.equal(nf4_dequantize(q, torch.float32), q.dequantize(torch.float32)), shape
    assert len(poisoned_outputs) == 2 * len(NF4_SHAPES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 5, 16])
def test_nf4_matmul_against_float64(dtype, M, poisoned_outputs):
    from lora.kernels import nf4_matmul
    g = torch.Generator().manual_seed(M)
    for (N, K), bias in (((29, 45), True), ((67, 131), False), ((33, 200), True)):
        q = lora.quantize_nf4((torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)).to(DEVICE)
        x = torch.randn(M, K, generator=g).to(DEVICE, dtype)
        b = torch.randn(N, generator=g).to(DEVICE, dtype) if bias else None
        ref = x.double() @ q.dequantize().double().t() + (b.double() if bias else 0)
        assert_near(nf4_matmul(x, q, b), ref, dtype)
    with pytest.raises(lora.LoRAError, match="M ≤ 16"):
        nf4_matmul(torch.zeros(17, 45, device=DEVICE), lora.quantize_nf4(torch.ones(3, 45)).to(DEVICE))


@pytest.mark.parametrize("M", [3, 40])
def test_nf4_base_generates_through_the_kernels(M, poisoned_outputs):
    """No gradients on the Triton path: M ≤ 16 by the fused kernel, more rows by the dequantize kernel
    and the LoRA kernels; a frozen NF4Linear the same way."""
    from lora.quant.linear import NF4Linear
    torch.manual_seed(0)
    base = NF4Linear.from_linear(torch.nn.Linear(45, 29)).to(DEVICE)
    layer = lora.LoRALinear(base, r=4, alpha=8.0, init_lora_weights=False).to(DEVICE)
    x = torch.randn(M, 45, device=DEVICE)
    W = base.weight.dequantize(torch.float64)
    ref = x.double() @ W.t() + base.bias.double()
    lora_ref = ref + layer.scaling * (x.double() @ layer.lora_A.double().t()) @ layer.lora_B.double().t()
    lora.set_backend("triton")
    try:
        with torch.no_grad():
            assert_near(layer(x), lora_ref, torch.float32)
            assert_near(base(x), ref, torch.float32)
    finally:
        lora.set_backend("auto")
    assert poisoned_outputs                                            # the kernels ran
