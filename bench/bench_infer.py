"""Generation speed: a LoRA adapter unmerged vs merged, beside the base model (the floor) and beside
transformers' own `generate`, all greedy on the same random Llama, same prompts, same token count.

  floor    base model without adapter, our loop (lora/inference/generate.py): the least adapter inference can cost
  merged   adapter folded into the weights (lora.merge_lora), our loop: should match the floor
  adapter  adapter kept as LoRALinear layers (x Aᵀ Bᵀ on every projection, every step), our loop
  hf       transformers' model.generate(do_sample=False) on the merged model: the loop's own overhead

Each provider runs once to warm up, then `--repeats` rounds run every provider in turn (so that a
slow spell of a shared machine hits all of them); the median is reported. Every provider must
produce the same tokens as `merged` (checked; `floor` differs: it has no adapter). End-of-sequence is
off, so every row generates exactly --new-tokens tokens. Writes bench/results/infer-<device>.{json,md}.

    python bench/bench_infer.py                       # cpu: 4 layers, hidden 512, batch 1 and 8
    python bench/bench_infer.py --device cuda --layers 16 --hidden 2048 --vocab 32000 --dtype bfloat16 \
        --prompt-tokens 512 --new-tokens 128
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora import LoRAConfig, apply_lora, merge_lora  # noqa: E402
from lora.inference.generate import generate, left_pad  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size; heads of 64, GQA 4:1 (default 512)")
    p.add_argument("--vocab", type=int, default=8000, help="vocabulary size (default 8000)")
    p.add_argument("--r", type=int, default=16, help="adapter rank on all seven projections (default 16)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default 64)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds, median kept (default 5)")
    p.add_argument("--out", default=None, help="results path without suffix (default bench/results/infer-<device>)")
    return p.parse_args(argv)


def build_models(args):
    """(base, adapter, merged): one random Llama; the adapter has random A and B (not a no-op)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    heads = args.hidden // 64
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1),
                      max_position_embeddings=args.prompt_tokens + args.new_tokens + 16,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    def fresh():
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg).to(dtype)
        m.generation_config.eos_token_id = None
        return m

    base = fresh()
    adapter = fresh()
    apply_lora(adapter, LoRAConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, init_lora_weights=False))
    with torch.no_grad():     # B small enough that the adapted model still has sharp logits
        for name, p in adapter.named_parameters():
            if name.endswith("lora_B"):
                p.mul_(0.05)
    merged = fresh()                                                # same base, then the same adapter
    apply_lora(merged, adapter.lora_config)
    merged.load_state_dict(adapter.state_dict())
    merge_lora(merged)
    return [m.to(args.device).eval() for m in (base, adapter, merged)]


def sync(device):
    mod = getattr(torch, torch.device(device).type, None)
    if mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize()


def run_ours(model, prompts, n):
    g = generate(model, prompts, n, eos_token_id=(), pad_token_id=0)
    return g.tokens, g.prefill_s, g.decode_s


def run_hf(model, prompts, n):
    input_ids, mask = left_pad(prompts, 0, device=next(model.parameters()).device)
    sync(input_ids.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    sync(input_ids.device)
    return out[:, input_ids.shape[1]:].tolist(), float("nan"), time.perf_counter() - t0


def measure_all(providers, prompts, n, repeats):
    """{name: (tokens, total s, prefill s, decode s)}, medians over `repeats` rounds. Each round runs
    every provider once, in turn, so that a slow spell of a shared machine hits them all alike."""
    runs = {name: [] for name, _, _ in providers}
    tokens = {}
    for name, model, fn in providers:
        tokens[name] = fn(model, prompts, n)[0]               # warm-up, and the tokens to compare
    for _ in range(repeats):
        for name, model, fn in providers:
            sync(next(model.parameters()).device)
            t0 = time.perf_counter()
            _, prefill, decode = fn(model, prompts, n)
            runs[name].append((time.perf_counter() - t0, prefill, decode))
    return {name: (tokens[name], *(statistics.median(r[i] for r in runs[name]) for i in range(3)))
            for name in runs}


def main(argv=None):
    args = parse_args(argv)
    base, adapter, merged = build_models(args)
    g = torch.Generator().manual_seed(1)
    rows, md = [], []
    for B in args.batch:
        prompts = torch.randint(1, args.vocab, (B, args.prompt_tokens), generator=g).tolist()
        providers = (("floor", base, run_ours), ("merged", merged, run_ours),
                     ("adapter", adapter, run_ours), ("hf", merged, run_hf))
        results = measure_all(providers, prompts, args.new_tokens, args.repeats)
        same = {k: results[k][0] == results["merged"][0] for k in ("adapter", "hf")}
        floor_total = results["floor"][1]
        for name, (tokens, total, prefill, decode) in results.items():
            decode_tps = B * (args.new_tokens - 1) / decode if name != "hf" else float("nan")
            rows.append(dict(provider=name, batch=B, total_s=total, prefill_ms=1000 * prefill,
                             decode_tokens_per_s=decode_tps, tokens_per_s=B * args.new_tokens / total,
                             ratio_to_floor=total / floor_total,
                             same_tokens_as_merged=same.get(name, name == "merged" or None)))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    head = (f"Generation, {device}, {args.dtype}: Llama {args.layers} layers, hidden {args.hidden}, vocab "
            f"{args.vocab}, r={args.r} on all 7 projections; prompt {args.prompt_tokens} tokens, "
            f"{args.new_tokens} new tokens, greedy, median of {args.repeats}")
    md += [head, "", "| provider | batch | total s | prefill ms | decode tok/s | tok/s | × floor | same tokens as merged |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        md.append(f"| {r['provider']} | {r['batch']} | {r['total_s']:.3f} | {r['prefill_ms']:.1f} | "
                  f"{r['decode_tokens_per_s']:.1f} | {r['tokens_per_s']:.1f} | {r['ratio_to_floor']:.2f} | "
                  f"{'' if r['same_tokens_as_merged'] is None else r['same_tokens_as_merged']} |")
    text = "\n".join(md)
    print(text)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"infer-{torch.device(args.device).type}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(device=device, args=vars(args), rows=rows), indent=2) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    bad = [r for r in rows if r["same_tokens_as_merged"] is False]
    if bad:
        print(f"error: {', '.join(r['provider'] for r in bad)} generated other tokens than the merged model",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
