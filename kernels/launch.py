"""What every launcher shares: interpreter detection, M buckets for autotune, r padding, allocation.

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`,
read when this package is imported: `triton.jit` decides then whether a kernel is compiled or
interpreted). Interpreted kernels are numpy loops, so the launchers skip autotuning there and run one
small fixed config.
"""
from __future__ import annotations

import os

import triton
import torch

try:                                    # a user mistake is a LoRAError when the lora package is there
    from lora.errors import LoRAError as InputError
except ImportError:                     # imported as a bare top-level `kernels`
    InputError = ValueError

# True when the kernels of this import were decorated as interpreted (numpy) functions.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)
# LORA_KERNELS_AUTOTUNE=0: on a GPU, launch each M bucket's first listed config instead of timing them
# all (no tuning latency: quick test runs, short jobs).
AUTOTUNE: bool = os.environ.get("LORA_KERNELS_AUTOTUNE", "1") != "0"

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_RANK = 256


def m_bucket(M: int) -> int:
    """The autotune key for the row count M: decode (M ≤ 16), small (≤ 64), medium (≤ 256), and
    prefill/training (larger). One best config is kept per bucket, not one per distinct M."""
    if M <= 16:
        return 16
    if M <= 64:
        return 64
    if M <= 256:
        return 256
    return 512


def rank_block(r: int, cap: int) -> int:
    """The padded rank tile: a power of two ≥ 16 (the smallest `tl.dot` dimension), at most `cap`.
    Padding lanes are loaded as zeros by masks, so they add nothing to the result."""
    return min(max(16, triton.next_power_of_2(r)), cap)


def bucket_pruner(table: dict[int, list[tuple]], names: tuple[str, ...]):
    """An `early_config_prune` hook that keeps the configs listed for the call's M bucket.

    table: bucket -> [(block sizes in `names` order..., num_stages, num_warps)]."""
    def prune(configs, named_args, **kwargs):
        bucket = {**named_args, **kwargs}["M_BUCKET"]
        wanted = set(table[bucket])
        kept = [c for c in configs
                if tuple(c.kwargs[n] for n in names) + (c.num_stages, c.num_warps) in wanted]
        return kept or configs
    return prune


def configs_from(table: dict[int, list[tuple]], names: tuple[str, ...], **fixed) -> list[triton.Config]:
    """The union of all buckets' configs, each once, as `triton.Config`s."""
    seen, out = set(), []
    for rows in table.values():
        for row in rows:
            if row in seen:
                continue
            seen.add(row)
            *blocks, stages, warps = row
            out.append(triton.Config(dict(zip(names, blocks), **fixed), num_stages=stages, num_warps=warps))
    return out


def launch(kernel, tuned, grid, args: tuple, meta: dict, M: int, table: dict, names: tuple,
           interpret_config: dict, fixed: dict | None = None) -> None:
    """Run `kernel` (heuristics-wrapped jit function) or its autotuned twin `tuned`.

    grid(config) -> launch grid for a dict of the tuned block sizes. Interpreted: `interpret_config`
    (one small config; autotuning would run every config as numpy). AUTOTUNE off: the first config of
    M's bucket in `table`. Otherwise the autotuner picks per (bucket, shape) and caches the choice."""
    fixed = fixed or {}
    if INTERPRET:
        cfg = dict(interpret_config)
    elif not AUTOTUNE:
        *blocks, stages, warps = table[m_bucket(M)][0]
        cfg = dict(zip(names, blocks), **fixed, num_stages=stages, num_warps=warps)
    else:
        tuned[grid](*args, **meta)
        return
    kernel[grid(cfg)](*args, **meta, **cfg)


def dot_meta(dtype: torch.dtype) -> dict:
    """The constexprs of `mma` for inputs of `dtype`. fp32 inputs follow torch's own matmul setting
    (TF32 only where torch would use it too); interpreted bf16 is upcast (see mma.py)."""
    tf32 = dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return dict(DOT_PRECISION="tf32" if tf32 else "ieee", UPCAST=INTERPRET and dtype == torch.bfloat16)


def empty_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every buffer a kernel writes in full is allocated here (tests replace it with a NaN-filled one
    to prove that no element is left unwritten)."""
    return torch.empty(shape, dtype=dtype, device=device)


def check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.is_cuda:
            continue
        if INTERPRET and t.device.type == "cpu":
            continue
        raise InputError(f"lora.kernels runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
                         f"before import), got a tensor on {t.device}")
