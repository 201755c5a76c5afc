"""Compile every kernel ahead of time for an NVIDIA target, without a GPU.

The interpreter (how CI runs the kernels) executes them as numpy and skips the compiler entirely, so
type or layout errors that only the compiler rejects would first show on a GPU. This lowers each
kernel, with dropout on, through Triton's full pipeline (TTIR, TTGIR, LLVM, PTX, cubin via the ptxas
bundled with triton) for the given compute capability; the GEMM and the dY pass also in their DoRA
forms (kernels/dora.py).

    python -m lora.kernels.compile_check            # sm_90 (H100), bf16
    python -m lora.kernels.compile_check 80 fp32    # sm_80 (A100), fp32 inputs (IEEE dots)

Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import dropout, dy_pass, gemm, grad_a, launch, shrink

_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _compile(fn, dtype: str, fp32_ptrs: tuple[str, ...], constexprs: dict, target: GPUTarget, num_warps: int,
             num_stages: int):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in fp32_ptrs else _PTR[dtype]
        elif name in ("scaling", "dropout_p"):
            sig[name] = "fp32"
        elif name == "seed":
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=target, options=dict(num_warps=num_warps, num_stages=num_stages))


def compile_all(capability: int = 90, dtype: str = "bf16") -> dict[str, object]:
    """{kernel name: CompiledKernel} for one mid-size config of each kernel, dropout on."""
    if launch.INTERPRET:
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the kernels were imported interpreted)")
    target = GPUTarget("cuda", capability, 32)
    dot = dict(DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False)
    lora = dict(COL_SCALE=False, STORE_U=False, DROP_X=False, K_SCALE=False, DROP_C=False)
    gemm_fp32 = ("col_ptr", "kscale_ptr")
    gemm_meta = dict(HAS_BIAS=True, EVEN_K=False, BLOCK_R=16, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, **dot)
    dy_meta = dict(EVEN_N=False, BLOCK_R=64, BLOCK_M=64, BLOCK_N=64, **dot)
    return {
        "shrink": _compile(shrink._shrink_kernel, dtype, ("out_ptr",), dict(
            HAS_DROPOUT=True, EVEN_K=False, SPLIT_K=4, BLOCK_R=16, BLOCK_M=16, BLOCK_K=128, **dot),
            target, 4, 3),
        "gemm": _compile(gemm._gemm_kernel, dtype, gemm_fp32, dict(HAS_DROPOUT=True, **lora, **gemm_meta),
                         target, 4, 3),
        "gemm_dora_fwd": _compile(gemm._gemm_kernel, dtype, gemm_fp32, dict(
            HAS_DROPOUT=False, **dict(lora, COL_SCALE=True, STORE_U=True, DROP_X=True), **gemm_meta), target, 4, 3),
        "gemm_dora_dx": _compile(gemm._gemm_kernel, dtype, gemm_fp32, dict(
            HAS_DROPOUT=False, **dict(lora, K_SCALE=True, DROP_C=True), **gemm_meta), target, 4, 3),
        "dy_pass": _compile(dy_pass._dy_pass_kernel, dtype, ("db_ptr", "g_ptr", "dyu_ptr"), dict(
            COL_SCALE=False, GRAD_M=False, **dy_meta), target, 4, 3),
        "dy_pass_dora": _compile(dy_pass._dy_pass_kernel, dtype, ("db_ptr", "g_ptr", "dyu_ptr"), dict(
            COL_SCALE=True, GRAD_M=True, **dy_meta), target, 4, 3),
        "grad_a": _compile(grad_a._grad_a_kernel, dtype, ("out_ptr",), dict(
            HAS_DROPOUT=True, SPLIT_M=2, BLOCK_R=16, BLOCK_M=64, BLOCK_K=64, **dot), target, 4, 3),
        "dropout_mask": _compile(dropout._mask_kernel, dtype, ("out_ptr",), dict(BLOCK_M=32, BLOCK_K=32),
                                 target, 4, 1),
    }


if __name__ == "__main__":
    cap = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    dt = sys.argv[2] if len(sys.argv) > 2 else "bf16"
    for name, kernel in compile_all(cap, dt).items():
        print(f"{name}: sm_{cap} {dt} cubin {len(kernel.asm['cubin'])} bytes, shared memory {kernel.metadata.shared}")
