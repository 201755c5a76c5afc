"""One LoRA training step against its floor: the frozen base's forward + input-gradient backward.

Three providers on the same model and batch, timed in alternating rounds in one process:
  floor  the frozen base model: forward, loss, backward to the input embeddings (no weight grads)
  peft   PEFT's LoRA (when peft is installed) + fused AdamW step on the adapter
  ours   lora.apply_lora + fused AdamW step on the adapter (q/k/v and gate/up share one shrink)
  ours-ungrouped  the same with one op per projection (--providers floor,ours,ours-ungrouped)
  ours-saved-input  ours keeping every LoRA input for backward, none recomputed (lora.set_recompute_inputs)
  ours-mkl  ours with the adapter's thin products on torch.mm (MKL), not oneDNN (lora.set_thin_gemm)
  ours-dora, peft-dora  DoRA (use_dora=True) in ours and in PEFT (--providers floor,ours,ours-dora,peft-dora):
                   the table gains PEFT-DoRA ÷ this (time, per round) and this ÷ ours (ours-DoRA over ours-LoRA)
Peak memory is measured per provider in a fresh subprocess, over two steps after a first one:
  peak tensor memory  the most bytes held by tensors at once (torch's allocator, as the profiler reports
                      it on CPU; torch.cuda.max_memory_allocated on a GPU). Deterministic.
  peak RSS            the whole process's resident set (CPU), which also counts what the C allocator
                      holds: with freed memory kept (--keep-freed-memory) it depends on fragmentation.
Each also has its rise above the resident model (weights, adapter, optimizer state): the step's
activations, gradients and temporaries (tensor_step_mb, step_mb in the JSON).
Writes bench/results/train-<device>.json and prints a markdown table.

    python bench/bench_train.py                  # the default CPU config: 6 x 1024, GQA 16/4, vocab 5120, seq 256, batch 4, r=16
    python bench/bench_train.py --dropout 0.05
    python bench/bench_train.py --preset llama-1b --dtype bf16   # on a GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import lora  # noqa: E402
from lora.runtime.malloc import keep_freed_memory  # noqa: E402
PRESETS = {
    # The default CPU config: six 1024-wide layers and a 5,120-word vocabulary, so that the output head
    # is the same share of the step's GEMM FLOPs as in Llama-3-8B (about 7%; see flop_shares).
    "cpu-llama-6x1024": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
                             num_key_value_heads=4, vocab_size=5120),
    # The same layers with a 32,000-word vocabulary: the head is a third of the GEMM FLOPs and dilutes
    # the adapter's cost (the README's earlier tables used it).
    "cpu-6x1024": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=32000),
    # Llama-3.2-1B-shaped (GPU)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
    # Llama-3-8B-shaped (GPU)
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROVIDERS = ("floor", "peft", "ours")   # also available: "ours-ungrouped", "ours-saved-input", "ours-mkl"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu-llama-6x1024", choices=PRESETS,
                   help="model shape: cpu-llama-6x1024 (default; the head's FLOP share as in Llama-3-8B), cpu-6x1024 "
                        "(the same layers, vocab 32000), llama-1b, llama-8b")
    p.add_argument("--layers", type=int, help="override the preset's number of layers")
    p.add_argument("--batch", type=int, default=4, help="sequences per step (default 4)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank on all seven projections (default 16)")
    p.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (default 0)")
    p.add_argument("--dtype", default="fp32", choices=DTYPES, help="model dtype (bf16 on GPU: weights bf16, adapter fp32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=5, help="timed steps per provider (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per provider first (default 2)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma list of floor,peft,ours,ours-ungrouped,ours-saved-input,ours-mkl,ours-dora,peft-dora")
    p.add_argument("--no-memory", action="store_true", help="skip the per-provider peak-memory subprocesses")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="CPU: glibc keeps freed memory in the process (lora.runtime.malloc, as train.py does) for every "
                        "provider; --no-keep-freed-memory measures glibc's defaults (default: keep)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/train-<device>[-dropout].json)")
    p.add_argument("--_memory-child", dest="memory_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build_base(args):
    from transformers import LlamaConfig, LlamaForCausalLM
    shape = dict(PRESETS[args.preset])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    cfg = LlamaConfig(**shape, max_position_embeddings=max(2048, args.seq))
    torch.manual_seed(0)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg).to(DTYPES[args.dtype])
    model.requires_grad_(False)
    return model


def make_provider(name, base, args):
    """(model, optimizer or None) for one provider; the base weights are copied, never shared."""
    targets = list(TARGETS)
    model = copy.deepcopy(base)
    if name == "floor":
        return model, None
    if name in ("peft", "peft-dora"):
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                                                           target_modules=targets, task_type="CAUSAL_LM",
                                                           use_dora=name == "peft-dora"))
    else:
        lora.apply_lora(model, lora.LoRAConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                                               target_modules=targets, use_dora=name == "ours-dora"),
                        group_shared_inputs=name != "ours-ungrouped")
        model.lora_recompute_inputs = name != "ours-saved-input"      # applied by step()
        model.lora_thin_gemm = "torch" if name == "ours-mkl" else "auto"
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():     # a non-zero B so the LoRA branch is real work
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return model, torch.optim.AdamW(params, lr=1e-4, fused=True)     # as train.py's (lora/runtime/device.py)


def make_batch(base, args):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    return ids


def step(model, opt, ids, args):
    """One training step. The floor runs the same forward + backward with every weight frozen. Every
    provider's input embeddings require grad, so all of them compute the same input gradients (the
    floor's backward must reach every layer; LoRA alone would skip layer 0's dX) and the difference
    is the adapter's cost alone."""
    model.train()
    if hasattr(model, "lora_recompute_inputs"):
        lora.set_recompute_inputs(model.lora_recompute_inputs)
        lora.set_thin_gemm(model.lora_thin_gemm)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16" and args.device != "cpu")
    with autocast:
        loss = model(inputs_embeds=emb, labels=ids).loss
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss


def flop_shares(base, args) -> dict:
    """The step's arithmetic, counted from the model's shapes (per step, batch × seq tokens T):
      floor    4 · N · T for the frozen GEMMs (forward 2N, input gradient 2N; N = every Linear's weights,
               the head included) + attention's QKᵀ and AV, causal (half the scores), forward and backward
               (3 × the forward's 2 · 2 · T · seq/2 · hidden per layer)
      adapter  6 · r · (in + out) · T per adapted projection: the shrink and the expand, then dS, dB, dA
               and the r columns of dX
    head_share is the output head's part of the floor; adapter_share the adapter's part of floor + adapter."""
    T, c = args.batch * args.seq, base.config
    linears = [m for m in base.modules() if isinstance(m, torch.nn.Linear)]
    gemm = 4 * sum(m.weight.numel() for m in linears) * T
    attention = 3 * 2 * 2 * T * (args.seq / 2) * c.hidden_size * c.num_hidden_layers
    head = 4 * base.get_output_embeddings().weight.numel() * T
    adapted = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS]
    adapter = sum(6 * args.r * (m.in_features + m.out_features) * T for m in adapted)
    floor = gemm + attention
    return dict(floor_flops=floor, adapter_flops=adapter, head_share=head / floor,
                adapter_share=adapter / (floor + adapter))


def sync(args):
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def time_providers(args, names):
    base = build_base(args)
    ids = make_batch(base, args)
    models = {n: make_provider(n, base, args) for n in names}
    # GEMM weights of the base (the embedding lookup is no matmul; attention's QKᵀ and AV are left
    # out, so MFU errs low)
    gemm_params = sum(m.weight.numel() for m in base.modules() if isinstance(m, torch.nn.Linear))
    shares = flop_shares(base, args)
    del base
    times = {n: [] for n in names}
    for _ in range(args.warmup):
        for n in names:
            step(*models[n], ids, args)
    sync(args)
    for i in range(args.steps):                    # alternate so drift hits every provider alike, and
        for n in names[i % len(names):] + names[:i % len(names)]:   # rotate who goes first each round
            sync(args)
            t0 = time.perf_counter()
            step(*models[n], ids, args)
            sync(args)
            times[n].append(time.perf_counter() - t0)
    return times, models, gemm_params, shares


def bootstrap_ci(ratios, resamples=4000, seed=0):
    """A 95% interval for the median of per-round ratios: the rounds resampled with replacement."""
    import random
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return [meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Samples the resident set every millisecond in a thread; `peak` is the highest seen."""

    def __init__(self):
        import threading
        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def live_tensor_mb() -> float:
    """The bytes of every CPU tensor storage the garbage collector can reach (each storage once)."""
    import gc
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values()) / 2**20


def tensor_peak_rise_mb(run) -> float:
    """How far the bytes held by CPU tensors rise above their level at the start while `run()` runs:
    every allocation and free that torch's allocator reports to the profiler, summed in time order.
    Deterministic, unlike RSS, which also counts what the C allocator keeps (lora.runtime.malloc) or fragments."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    # The raw records (one per allocation or free, with its size) are what torch.autograd.profiler
    # itself sums into each op's memory; `events()` has them named "[memory]".
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in records:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def memory_child(args, name):
    """Runs in a subprocess: the peak memory of `name`'s training steps, and how far it rises above the
    resident model (weights, adapter, optimizer state after a first step). On CPU, twice: the process's
    resident set (what the OS sees, including what the C allocator holds), and the bytes held by
    tensors (what torch allocated; what `torch.cuda.max_memory_allocated` reports on a GPU)."""
    base = build_base(args)
    ids = make_batch(base, args)
    model, opt = make_provider(name, base, args)
    del base
    step(model, opt, ids, args)              # optimizer state exists from here on
    two_steps = lambda: [step(model, opt, ids, args) for _ in range(2)]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        two_steps()
        peak = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps({"peak_mb": peak, "step_mb": peak - before,
                          "tensor_peak_mb": peak, "tensor_step_mb": peak - before}))
        return
    import ctypes
    import gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)      # hand freed pages back, so RSS = live memory
    before = rss_mb()
    with PeakRSS() as sampler:
        two_steps()
    resident = live_tensor_mb()
    rise = tensor_peak_rise_mb(two_steps)
    print(json.dumps({"peak_mb": sampler.peak, "step_mb": sampler.peak - before,
                      "tensor_peak_mb": resident + rise, "tensor_step_mb": rise}))


def measure_memory(args, name, argv):
    # The child rebuilds only this provider: the copy that make_provider deep-copies is freed first.
    r = subprocess.run([sys.executable, __file__, *argv, "--_memory-child", name], capture_output=True, text=True,
                       cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"memory run of {name} failed: {r.stderr[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    kept = args.device == "cpu" and args.keep_freed_memory and keep_freed_memory()
    if args.memory_child:
        return memory_child(args, args.memory_child)
    names = [n for n in args.providers.split(",") if n]
    unknown = set(names) - {"floor", "peft", "ours", "ours-ungrouped", "ours-saved-input", "ours-mkl",
                            "ours-dora", "peft-dora"}
    if unknown:
        sys.exit(f"bench_train.py: error: unknown provider(s) {', '.join(sorted(unknown))}")
    if "peft" in names or "peft-dora" in names:
        try:
            import peft  # noqa: F401
        except ImportError:
            print("peft not installed: skipping the peft providers", file=sys.stderr)
            names = [n for n in names if n not in ("peft", "peft-dora")]
    if args.device == "cpu":
        device_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    else:
        device_name = torch.cuda.get_device_name()
    times, models, gemm_params, shares = time_providers(args, names)
    tokens = args.batch * args.seq
    rows = []
    for n in names:
        med = statistics.median(times[n])
        rows.append(dict(provider=n, step_s=med, min_step_s=min(times[n]), tokens_per_s=tokens / med, steps=times[n]))
    # Ratios are medians of per-round ratios: each round runs every provider once, back to back,
    # so drift in machine speed (shared cores) cancels within a round.
    per_round = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))
    ci = lambda a, b: bootstrap_ci([x / y for x, y in zip(times[a], times[b])])
    floor = "floor" if "floor" in names else None
    peft_s = "peft" if "peft" in names else None
    for r in rows:
        r["ratio_to_floor"] = per_round(r["provider"], floor) if floor else None
        r["speedup_vs_peft"] = per_round(peft_s, r["provider"]) if peft_s else None
        r["ratio_to_floor_ci95"] = ci(r["provider"], floor) if floor and r["provider"] != floor else None
        r["speedup_vs_peft_ci95"] = ci(peft_s, r["provider"]) if peft_s and r["provider"] != peft_s else None
        if "peft-dora" in names and r["provider"] != "peft-dora":
            r["speedup_vs_peft_dora"] = per_round("peft-dora", r["provider"])
            r["speedup_vs_peft_dora_ci95"] = ci("peft-dora", r["provider"])
        if r["provider"] == "ours-dora" and "ours" in names:
            r["ratio_to_ours"] = per_round("ours-dora", "ours")
            r["ratio_to_ours_ci95"] = ci("ours-dora", "ours")
        if args.device.startswith("cuda"):      # MFU: 6·N·tokens for the base fwd+bwd would count dW;
            flops = 4 * gemm_params * tokens    # the frozen base needs fwd (2N) + input grads (2N) per token
            r["mfu"] = flops / r["step_s"] / PEAK_TFLOPS.get(args.dtype, 1) / 1e12
    if floor:
        shares["floor_gflops_per_s"] = shares["floor_flops"] / statistics.median(times[floor]) / 1e9
    del models
    if not args.no_memory:
        for r in rows:
            r.update(measure_memory(args, r["provider"], argv))
        floor_mem = next((r["peak_mb"] for r in rows if r["provider"] == "floor"), None)
        peft_mem = next((r for r in rows if r["provider"] == "peft"), None)
        for r in rows:
            r["peak_vs_floor"] = r["peak_mb"] / floor_mem if floor_mem else None
            r["peak_vs_peft"] = r["peak_mb"] / peft_mem["peak_mb"] if peft_mem else None
            r["step_mem_vs_peft"] = r["step_mb"] / peft_mem["step_mb"] if peft_mem else None
            r["tensor_peak_vs_peft"] = r["tensor_peak_mb"] / peft_mem["tensor_peak_mb"] if peft_mem else None
        peft_dora_mem = next((r for r in rows if r["provider"] == "peft-dora"), None)
        for r in rows:
            if peft_dora_mem:
                r["tensor_peak_vs_peft_dora"] = r["tensor_peak_mb"] / peft_dora_mem["tensor_peak_mb"]
                r["peak_vs_peft_dora"] = r["peak_mb"] / peft_dora_mem["peak_mb"]
    shape = dict(PRESETS[args.preset], **({"num_hidden_layers": args.layers} if args.layers else {}))
    result = dict(device=device_name, config=dict(vars(args), memory_child=None), tokens_per_step=tokens,
                  model=shape, flops=shares,
                  malloc="glibc, freed memory kept (lora.runtime.malloc)" if kept else "default",
                  torch=torch.__version__, results=rows)
    tag = "cpu" if args.device == "cpu" else torch.cuda.get_device_name().replace(" ", "-")
    out = Path(args.out or ROOT / "bench" / "results" / f"train-{tag}{'-dropout' if args.dropout else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwrote {out}")


PEAK_TFLOPS = {"bf16": 989.0, "fp32": 494.0}   # H100/H200 SXM dense tensor-core peaks (fp32 = TF32)


def model_line(result) -> str:
    """The model's shape and where the step's FLOPs go (flop_shares), for the table's header."""
    m, fl = result.get("model"), result.get("flops")
    if not m or not fl:
        return ""
    rate = fl.get("floor_gflops_per_s")
    return (f"model: {m['num_hidden_layers']} layers × {m['hidden_size']} (intermediate {m['intermediate_size']}, "
            f"heads {m['num_attention_heads']}/{m['num_key_value_heads']}), vocab {m['vocab_size']} · "
            f"output head {fl['head_share']:.1%} of the floor's FLOPs · adapter {fl['adapter_share']:.1%} of the step's "
            f"FLOPs" + (f" · floor {rate:.0f} GFLOP/s achieved" if rate else ""))


def table(result) -> str:
    c = result["config"]
    lines = [f"{result['device']} · ratios are medians of per-round ratios (95% bootstrap interval) · preset {c['preset']}{' layers=' + str(c['layers']) if c['layers'] else ''} · "
             f"batch {c['batch']} × seq {c['seq']} · r={c['r']} · dropout {c['dropout']} · {c['dtype']} · "
             f"median of {c['steps']} alternating steps · malloc: {result.get('malloc', 'default')}",
             *filter(None, [model_line(result)]), "", "| provider | step (s), median | min | tokens/s | × floor | PEFT ÷ this | peak tensor memory (MB) | ÷ PEFT's | peak RSS (MB) | ÷ PEFT's |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "–" if v is None else format(v, fmt)
    fci = lambda v, c: f(v, ".3f") + (f" ({c[0]:.3f}–{c[1]:.3f})" if c else "")
    mfu = any("mfu" in r for r in result["results"])       # on a GPU
    if mfu:
        lines[0] += f" · MFU: 4 × base GEMM parameters × tokens per step ÷ {PEAK_TFLOPS[c['dtype']]:.0f} TFLOP/s"
        lines[-2] += " MFU |"
        lines[-1] += "---|"
    for r in result["results"]:
        lines.append(f"| {r['provider']} | {r['step_s']:.3f} | {r['min_step_s']:.3f} | {r['tokens_per_s']:.0f} | {fci(r['ratio_to_floor'], r.get('ratio_to_floor_ci95'))} | "
                     f"{fci(r['speedup_vs_peft'], r.get('speedup_vs_peft_ci95'))} | {f(r.get('tensor_peak_mb'), '.0f')} | "
                     f"{f(r.get('tensor_peak_vs_peft'), '.2f')} | {f(r.get('peak_mb'), '.0f')} | {f(r.get('peak_vs_peft'), '.2f')} |"
                     + (f" {f(r.get('mfu'), '.1%')} |" if mfu else ""))
    dora = [r for r in result["results"] if "speedup_vs_peft_dora" in r or r["provider"] == "peft-dora"]
    if dora:
        lines += ["", "| provider | PEFT-DoRA ÷ this (time) | this ÷ ours (time) | peak tensor memory ÷ PEFT-DoRA's | peak RSS ÷ PEFT-DoRA's |",
                  "|---|---|---|---|---|"]
        for r in dora:
            lines.append(f"| {r['provider']} | {fci(r.get('speedup_vs_peft_dora'), r.get('speedup_vs_peft_dora_ci95'))} | "
                         f"{fci(r.get('ratio_to_ours'), r.get('ratio_to_ours_ci95'))} | "
                         f"{f(r.get('tensor_peak_vs_peft_dora'), '.2f')} | {f(r.get('peak_vs_peft_dora'), '.2f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
