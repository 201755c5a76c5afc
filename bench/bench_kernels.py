"""One LoRA linear against its floor, the frozen base linear alone: forward, and forward + backward.

Providers, all timed in one run on the same inputs:
  base        F.linear(x, W): the floor (its backward is dX = dY W only: W is frozen)
  peft_style  PEFT's unfused graph base(x) + lora_B(lora_A(dropout(x))) · scaling (real peft.tuners.lora.Linear
              when peft is installed, else the same graph written out in torch)
  fused       lora.kernels.lora_linear: the Triton kernels (CUDA only)
  torch_op    lora.core.op's plain autograd op (addmm epilogue): the CPU path; on CPU it stands in
              for `fused`, and is labelled as what it is

Shapes are Llama-3-8B's projections (K = in, N = out; o_proj ≡ q_proj, v_proj ≡ k_proj and
up_proj ≡ gate_proj have the same shapes and are not timed twice), M ∈ {1, 16, 512, 8192} tokens,
r ∈ {8, 16, 64}, bf16, dropout 0. Medians from triton.testing.do_bench on CUDA.

Writes bench/results/<device>.json (records: device, shape_name, M, N, K, r, dtype, provider, fwd_ms,
fwd_bwd_ms) and bench/results/<device>.md (the table: ms, TFLOP/s, GB/s, ratio to base in the same run).

    python bench/bench_kernels.py                    # the full sweep, on a CUDA GPU
    python bench/bench_kernels.py --M 8192 --r 16    # the headline point only
    python bench/bench_kernels.py --quick            # CPU, plain-PyTorch providers, small sizes (CI)
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora.storage.atomic import atomic_write_text  # noqa: E402
from lora.errors import LoRAError  # noqa: E402
from lora.core.op import lora_linear_torch  # noqa: E402

# (shape_name, K = in_features, N = out_features)
LLAMA3_8B = [("q_proj", 4096, 4096), ("k_proj", 4096, 1024), ("gate_proj", 4096, 14336), ("down_proj", 14336, 4096)]
QUICK = [(name, K // 8, N // 8) for name, K, N in LLAMA3_8B]      # the same aspect ratios, 1/8 the size
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FIELDS = ("device", "shape_name", "M", "N", "K", "r", "dtype", "provider", "fwd_ms", "fwd_bwd_ms")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CPU run for CI: base, peft_style and torch_op at 1/8 of the Llama sizes, "
                        "M in {1,16,256}, r in {8,16}, fp32, one thread, perf_counter medians")
    p.add_argument("--M", default=None, help="comma list of token counts (default 1,16,512,8192; quick 1,16,256)")
    p.add_argument("--r", default=None, help="comma list of ranks (default 8,16,64; quick 8,16)")
    p.add_argument("--shapes", default=None,
                   help="comma list among q_proj,k_proj,gate_proj,down_proj (default all four)")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="input dtype (default bf16; quick fp32)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per point with --quick (default 10)")
    p.add_argument("--out", default=None,
                   help="JSON path (default bench/results/<device>.json, quick: bench/results/cpu-quick.json); "
                        "the markdown table goes beside it as .md")
    p.add_argument("--plot", action="store_true",
                   help="also draw the forward+backward ratio to base per shape to <out>.png (needs matplotlib)")
    return p.parse_args(argv)


def int_list(text: str | None, default: list[int], flag: str) -> list[int]:
    if text is None:
        return default
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise LoRAError(f"{flag} takes a comma list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise LoRAError(f"{flag} values must be positive integers, got {text!r}")
    return values


# -- providers: each returns (forward, forward_backward) closures over fresh tensors ---------------

def make_peft_module(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float):
    """PEFT's own LoRA Linear when peft is installed (None otherwise), holding copies of W, A, B."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:
        return None
    r = A.shape[0]
    base = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device=W.device, dtype=W.dtype)
    cfg = LoraConfig(r=r, lora_alpha=scaling * r, lora_dropout=0.0, target_modules=["proj"])
    mod = PeftLinear(base, "default", config=cfg, r=r, lora_alpha=scaling * r, lora_dropout=0.0)
    mod.to(W.dtype)
    with torch.no_grad():
        mod.base_layer.weight.copy_(W)
        mod.lora_A["default"].weight.copy_(A)
        mod.lora_B["default"].weight.copy_(B)
    mod.base_layer.weight.requires_grad_(False)
    return mod


def providers(names, M, K, N, r, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=dtype, generator=g)
    W = torch.randn(N, K, device=device, dtype=dtype, generator=g) / K ** 0.5
    A = (torch.randn(r, K, device=device, dtype=dtype, generator=g) / K ** 0.5).requires_grad_()
    B = (torch.randn(N, r, device=device, dtype=dtype, generator=g) / r ** 0.5).requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=dtype, generator=g)
    xg = x.clone().requires_grad_()
    s = 2.0
    peft_mod = make_peft_module(W, A.detach(), B.detach(), s) if "peft_style" in names else None

    def peft_graph(inp):
        if peft_mod is not None:
            return peft_mod(inp)
        return F.linear(inp, W) + F.linear(F.linear(inp, A), B) * s   # PEFT's graph, written out

    ops = {"base": lambda inp: F.linear(inp, W),
           "peft_style": peft_graph,
           "torch_op": lambda inp: lora_linear_torch(inp, W, None, A, B, s, 0.0)}
    if "fused" in names:
        from lora.kernels import lora_linear
        ops["fused"] = lambda inp: lora_linear(inp, W, None, A, B, s, 0.0)
    grads = [xg, A, B] + (list(p for p in peft_mod.parameters() if p.requires_grad) if peft_mod else [])

    out = {}
    for name in names:
        op = ops[name]

        def fwd(op=op):
            with torch.no_grad():
                return op(x)

        def fwd_bwd(op=op):
            op(xg).backward(dy)
        out[name] = (fwd, fwd_bwd)
    return out, grads


# -- timing ------------------------------------------------------------------------------------

def time_cuda(fn, grads) -> float:
    import triton.testing
    fn()                                   # compile / autotune outside the timed region
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, grad_to_none=grads, return_mode="median")


def time_cpu_rounds(fns: dict, grads, reps: int) -> dict[str, float]:
    """Median ms per provider; the providers take turns in each round, so a load change on a shared
    machine hits all of them alike instead of whichever ran during it."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            for t in grads:
                t.grad = None
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


# -- figures -----------------------------------------------------------------------------------

def flops(rec, bwd: bool) -> float:
    """Useful FLOPs of the op measured. Base fwd: 2MNK; its backward adds dX = dY W (2MNK).
    LoRA adds the shrink and expand (2Mr(K+N)) forward; dS, dB (4MNr), dX's dS A and dA (4MrK) backward."""
    M, N, K, r = rec["M"], rec["N"], rec["K"], rec["r"]
    base = 2 * M * N * K * (2 if bwd else 1)
    if rec["provider"] == "base":
        return base
    return base + 2 * M * r * (K + N) + ((4 * M * N * r + 4 * M * r * K) if bwd else 0)


def bytes_moved(rec, bwd: bool) -> float:
    """Compulsory traffic (each operand read once, each result written once), in bytes."""
    M, N, K, r = rec["M"], rec["N"], rec["K"], rec["r"]
    e = {"bf16": 2, "fp16": 2, "fp32": 4}[rec["dtype"]]
    lora = rec["provider"] != "base"
    fwd = M * K + N * K + M * N + (r * (K + N) if lora else 0)
    back = M * N + N * K + M * K + ((M * K + 2 * r * (K + N)) if lora else 0)   # dY, W, dX (+ x for dA, A/B grads)
    return e * (fwd + (back if bwd else 0))


def table(records) -> str:
    floor = {(r["shape_name"], r["M"], r["r"]): r for r in records if r["provider"] == "base"}
    lines = ["| shape | M | N | K | r | provider | fwd ms | fwd TFLOP/s | fwd GB/s | fwd ÷ base "
             "| fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd GB/s | fwd+bwd ÷ base |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rec in records:
        base = floor[(rec["shape_name"], rec["M"], rec["r"])]
        cells = []
        for key, bwd in (("fwd_ms", False), ("fwd_bwd_ms", True)):
            ms = rec[key]
            cells += [f"{ms:.4g}", f"{flops(rec, bwd) / ms / 1e9:.3g}", f"{bytes_moved(rec, bwd) / ms / 1e6:.3g}",
                      f"{ms / base[key]:.3f}"]
        lines.append(f"| {rec['shape_name']} | {rec['M']} | {rec['N']} | {rec['K']} | {rec['r']} | "
                     f"{rec['provider']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed, no figure drawn", file=sys.stderr)
        return
    shapes = list(dict.fromkeys(r["shape_name"] for r in records))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4 * len(shapes), 3.5), squeeze=False)
    floor = {(r["shape_name"], r["M"], r["r"]): r["fwd_bwd_ms"] for r in records if r["provider"] == "base"}
    for ax, shape in zip(axes[0], shapes):
        for prov in dict.fromkeys(r["provider"] for r in records if r["provider"] != "base"):
            for rank in sorted({r["r"] for r in records}):
                pts = sorted((r["M"], r["fwd_bwd_ms"] / floor[(shape, r["M"], rank)]) for r in records
                             if r["shape_name"] == shape and r["provider"] == prov and r["r"] == rank)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{prov} r={rank}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set(title=shape, xlabel="M (tokens)", ylabel="fwd+bwd time ÷ base")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(records[0]["device"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# -- main --------------------------------------------------------------------------------------

def progress(items, desc):
    try:
        from tqdm import tqdm
        return tqdm(items, desc=desc, unit="point", file=sys.stderr)
    except ImportError:
        def plain():
            t0 = time.perf_counter()
            for i, item in enumerate(items):
                done = time.perf_counter() - t0
                eta = done / i * (len(items) - i) if i else 0.0
                print(f"\r{desc}: {i}/{len(items)}, {i / done if done else 0:.2f} point/s, ETA {eta:.0f}s",
                      end="", file=sys.stderr)
                yield item
            print(file=sys.stderr)
        return plain()


def run(args) -> tuple[list[dict], Path]:
    if args.quick:
        device, dev_name, names = "cpu", "cpu", ["base", "peft_style", "torch_op"]
        shapes, Ms, ranks, dtype_name = QUICK, [1, 16, 256], [8, 16], args.dtype or "fp32"
        default_out = ROOT / "bench" / "results" / "cpu-quick.json"
        torch.set_num_threads(1)     # one thread: steadier medians on a shared CI machine
    else:
        if not torch.cuda.is_available():
            raise LoRAError("the full benchmark needs a CUDA GPU (the fused kernels are Triton); "
                            "use --quick for the CPU run")
        device, dev_name = "cuda", torch.cuda.get_device_name()
        names = ["base", "peft_style", "torch_op", "fused"]
        shapes, Ms, ranks, dtype_name = LLAMA3_8B, [1, 16, 512, 8192], [8, 16, 64], args.dtype or "bf16"
        default_out = ROOT / "bench" / "results" / (re.sub(r"[^A-Za-z0-9._-]+", "-", dev_name) + ".json")
    Ms = int_list(args.M, Ms, "--M")
    ranks = int_list(args.r, ranks, "--r")
    if args.shapes:
        wanted = args.shapes.split(",")
        unknown = [s for s in wanted if s not in {n for n, _, _ in shapes}]
        if unknown:
            raise LoRAError(f"--shapes: unknown {unknown}; choose among {[n for n, _, _ in shapes]}")
        shapes = [s for s in shapes if s[0] in wanted]
    if args.reps < 1:
        raise LoRAError(f"--reps must be ≥ 1, got {args.reps}")
    dtype = DTYPES[dtype_name]

    points = [(s, M, r) for s in shapes for M in Ms for r in ranks]
    records = []
    for (shape_name, K, N), M, r in progress(points, "bench_kernels"):
        fns, grads = providers(names, M, K, N, r, dtype, device)
        if device == "cuda":
            t_fwd = {name: time_cuda(fns[name][0], grads) for name in names}
            t_fb = {name: time_cuda(fns[name][1], grads) for name in names}
        else:
            t_fwd = time_cpu_rounds({name: fns[name][0] for name in names}, grads, args.reps)
            t_fb = time_cpu_rounds({name: fns[name][1] for name in names}, grads, args.reps)
        for name in names:
            records.append(dict(device=dev_name, shape_name=shape_name, M=M, N=N, K=K, r=r, dtype=dtype_name,
                                provider=name, fwd_ms=round(t_fwd[name], 5), fwd_bwd_ms=round(t_fb[name], 5)))
        del fns, grads
    return records, Path(args.out) if args.out else default_out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        records, out = run(args)
    except LoRAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = table(records)
    note = ""
    if args.quick:
        note = ("CPU quick run: `torch_op` is lora.core.op's plain autograd op (the CPU path), not the "
                "Triton kernels; `fused` needs a CUDA GPU.\n\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(records, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), f"{records[0]['device']}, {records[0]['dtype']}, medians. "
                      f"{note}\n{md}\n")
    print(note + md)
    print(f"wrote {out} and {out.with_suffix('.md')}", file=sys.stderr)
    if args.plot:
        plot(records, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
