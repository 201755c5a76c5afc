"""`mma`: the one `tl.dot` every kernel here calls, fp32 accumulation.

Under the interpreter, Triton stores bfloat16 as uint16 and its `tl.dot` multiplies those bit
patterns (triton-lang/triton#11584, "not supported yet"), so interpreted bf16 tiles are upcast to
fp32 first (UPCAST). Compiled kernels never take that branch: on the GPU bf16 goes to tensor cores.
"""
import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. a: (P, Q), b: (Q, T) of one dtype, acc: (P, T) fp32."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out
