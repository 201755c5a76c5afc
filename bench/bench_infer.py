"""Decode speed with LoRA adapters: one adapter unmerged vs merged, and many adapters in one batch
(lora/serving/) vs one adapter, the merged floor and PEFT's mixed batch, all greedy on one random Llama.

Part 1, one adapter (batch 1 and 8 by default):
  merged   the adapter folded into the weights (plain nn.Linear): the floor
  adapter  the adapter kept as LoRALinear layers, no gradients (lora/core/infer_op.py)

Part 2, a batch of --serve-batch prompts (default 16):
  merged        adapter 0 merged into the weights: the floor
  one-adapter   adapter 0 as LoRALinear layers, every row
  ours-K        the --adapters adapters stacked (lora.serving.load_adapters), rows cycling over K of them
  peft-K        the same adapters in one PeftModel (load_adapter per name), `adapter_names=` per row

Every provider runs through the same KV-cache loop (lora/inference/generate.py; PEFT's forward is
given its `adapter_names` by a thin wrapper), end-of-sequence off, so decode times compare the
forwards alone. The adapters are trained-looking: random A and a random nonzero B on all seven
projections, r = --r. Each provider runs once to warm up; then --rounds rounds run every provider
in turn, the first provider rotating, so that a slow spell of a shared machine hits all alike. The
ratio is the median over rounds of (decode time ÷ the floor's decode time in the same round), with
the smallest and largest round ratio beside it; "÷ one-adapter tok/s" and "PEFT time ÷ ours" are
paired the same way (medians over rounds of the ratio of two providers' decode times in one round). Tokens are compared: part 1, the adapter's with the
merged model's; part 2, ours-1 and peft-1 with the one-adapter model's, ours-K with peft-K's. Under the
table, part 2's weight-streaming ceiling: K distinct adapters read (K − 1) × one adapter's bytes more per
step, at the read bandwidth measured by torch.mv. Writes bench/results/infer-<device>.{json,md}.

    OMP_NUM_THREADS=1 python bench/bench_infer.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora import LoRAConfig, apply_lora, load_adapter, merge_lora, save_adapter  # noqa: E402
from lora.inference.generate import generate  # noqa: E402
from lora.serving import MultiLoRALinear, load_adapters  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size; heads of 64, GQA 4:1 (default 512)")
    p.add_argument("--vocab", type=int, default=8000, help="vocabulary size (default 8000)")
    p.add_argument("--r", type=int, default=16, help="adapter rank on all seven projections (default 16)")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 8], help="part 1 batch sizes (default 1 8)")
    p.add_argument("--serve-batch", type=int, default=16, help="part 2 batch size (default 16; 0 = skip)")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16],
                   help="part 2: distinct adapters in the batch (default 1 4 16)")
    p.add_argument("--no-peft", action="store_true", help="part 2 without PEFT's mixed batch")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per prompt (default 32)")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    p.add_argument("--out", default=None, help="results path without suffix (default bench/results/infer-<device>)")
    return p.parse_args(argv)


def llama_config(args):
    from transformers import LlamaConfig
    heads = args.hidden // 64
    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                       num_hidden_layers=args.layers, num_attention_heads=heads,
                       num_key_value_heads=max(heads // 4, 1),
                       max_position_embeddings=args.prompt_tokens + args.new_tokens + 16,
                       bos_token_id=None, eos_token_id=None, pad_token_id=0)


def save_adapters(args, base_state, n: int, root: Path) -> list[Path]:
    """n adapters with random A and a random nonzero B (small enough that logits stay sharp)."""
    from transformers import LlamaForCausalLM
    dirs = []
    for k in range(n):
        torch.manual_seed(100 + k)
        m = LlamaForCausalLM(llama_config(args))
        m.load_state_dict(base_state)
        apply_lora(m, LoRAConfig(r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, init_lora_weights=False))
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("lora_B"):
                    p.mul_(0.05)
        save_adapter(m, root / f"a{k}")
        dirs.append(root / f"a{k}")
    return dirs


class Models:
    """Builds each provider's model from one base state and the saved adapters."""

    def __init__(self, args, base_state, dirs):
        self.args, self.state, self.dirs = args, base_state, dirs

    def base(self):
        from transformers import LlamaForCausalLM
        torch.manual_seed(0)
        m = LlamaForCausalLM(llama_config(self.args))
        m.load_state_dict(self.state)
        m.generation_config.eos_token_id = None
        return m

    def ready(self, m):
        for p in m.parameters():
            p.requires_grad_(False)
        return m.to(self.args.device, getattr(torch, self.args.dtype)).eval()

    def merged(self):
        return self.ready(merge_lora(load_adapter(self.base(), self.dirs[0])))

    def one_adapter(self):
        return self.ready(load_adapter(self.base(), self.dirs[0]))

    def ours(self):
        return self.ready(load_adapters(self.base(), {f"a{k}": d for k, d in enumerate(self.dirs)}))

    def peft(self):
        from peft import PeftModel
        m = PeftModel.from_pretrained(self.base(), str(self.dirs[0]), adapter_name="a0")
        for k, d in enumerate(self.dirs[1:], 1):
            m.load_adapter(str(d), adapter_name=f"a{k}")
        return self.ready(m)


class PeftRows(nn.Module):
    """A PeftModel whose every forward gets `adapter_names` (one per row): PEFT's mixed batch."""

    def __init__(self, model, names):
        super().__init__()
        self.model, self.names = model, names
        self.config, self.generation_config = model.config, model.generation_config

    def forward(self, **kw):
        return self.model(**kw, adapter_names=self.names)


def sync(device):
    mod = getattr(torch, torch.device(device).type, None)
    if mod is not None and hasattr(mod, "synchronize"):
        mod.synchronize()


def measure(providers, prompts, n, rounds):
    """{name: (tokens, [decode s per round], [prefill s per round])}; provider order rotates each round."""
    out = {}
    for name, model, kw in providers:
        g = generate(model, prompts, n, eos_token_id=(), pad_token_id=0, **kw)   # warm-up; the tokens
        out[name] = (g.tokens, [], [])
    for r in range(rounds):
        order = providers[r % len(providers):] + providers[:r % len(providers)]
        for name, model, kw in order:
            g = generate(model, prompts, n, eos_token_id=(), pad_token_id=0, **kw)
            out[name][1].append(g.decode_s)
            out[name][2].append(g.prefill_s)
    return out


def paired(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i] (two providers' times in the same round)."""
    return statistics.median(a / b for a, b in zip(num, den))


def read_bandwidth(device: str) -> float:
    """Bytes per second that a matrix-vector product streams from memory: torch.mv over a 256 MiB float32
    matrix (beyond any cache), median of 7."""
    W = torch.randn(8192, 8192, device=device)
    v = torch.randn(8192, device=device)
    times = []
    for _ in range(8):
        sync(device)
        t0 = time.perf_counter()
        torch.mv(W, v)
        sync(device)
        times.append(time.perf_counter() - t0)
    return W.nbytes / statistics.median(times[1:])


def streaming_ceiling(ours, args, one_adapter_ms: float, bandwidth: float) -> dict:
    """How far K distinct adapters can come to one adapter's throughput when a decode step must read
    each adapter the batch names once: K adapters read (K − 1) × one adapter's bytes more than one
    does, which at `bandwidth` costs at least that much time a step. {K: one-adapter step ÷ (that step
    + the extra reads)}, and one adapter's bytes."""
    one = sum(m.lora_A[0].nbytes + m.lora_Bt[0].nbytes for m in ours.modules() if isinstance(m, MultiLoRALinear))
    ceiling = {K: one_adapter_ms / (one_adapter_ms + 1000 * (K - 1) * one / bandwidth) for K in args.adapters}
    return dict(adapter_bytes=one, read_bandwidth=bandwidth, ceiling=ceiling)


def summarize(results, floor, B, args, part, same_as):
    """Rows of the table; `same_as(name)`: the provider whose tokens `name` must equal, or None."""
    rows = []
    base = results[floor][1]
    for name, (tokens, decode, prefill) in results.items():
        ref = same_as(name)
        ratios = [d / f for d, f in zip(decode, base)]
        rows.append(dict(part=part, provider=name, batch=B, decode_ms_per_step=1000 * statistics.median(decode) / (args.new_tokens - 1),
                         decode_tokens_per_s=B * (args.new_tokens - 1) / statistics.median(decode),
                         prefill_ms=1000 * statistics.median(prefill), floor=floor,
                         floor_decode_tokens_per_s=B * (args.new_tokens - 1) / statistics.median(base),
                         ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                         same_tokens=None if ref not in results else tokens == results[ref][0]))
    return rows


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    base_state = LlamaForCausalLM(llama_config(args)).state_dict()
    n_adapters = max(args.adapters) if args.serve_batch else 1
    g = torch.Generator().manual_seed(1)
    rows, ceiling = [], None
    with tempfile.TemporaryDirectory() as tmp:
        models = Models(args, base_state, save_adapters(args, base_state, n_adapters, Path(tmp)))
        merged, one = models.merged(), models.one_adapter()
        for B in args.batch:
            prompts = torch.randint(1, args.vocab, (B, args.prompt_tokens), generator=g).tolist()
            res = measure([("merged", merged, {}), ("adapter", one, {})], prompts, args.new_tokens, args.rounds)
            rows += summarize(res, "merged", B, args, "one adapter", lambda n: "merged" if n != "merged" else None)
        if args.serve_batch:
            B = args.serve_batch
            ours = models.ours()
            peft = None if args.no_peft else models.peft()
            prompts = torch.randint(1, args.vocab, (B, args.prompt_tokens), generator=g).tolist()
            providers = [("merged", merged, {}), ("one-adapter", one, {})]
            for K in args.adapters:
                names = [f"a{i % K}" for i in range(B)]
                providers.append((f"ours-{K}", ours, dict(adapters=names)))
                if peft is not None:
                    providers.append((f"peft-{K}", PeftRows(peft, names), {}))
            res = measure(providers, prompts, args.new_tokens, args.rounds)
            # ours-1 and peft-1 must give the one-adapter model's tokens; ours-K, PEFT's with K adapters.
            rows += summarize(res, "merged", B, args, "mixed batch",
                              lambda n: "one-adapter" if n.endswith("-1") else "peft-" + n[5:] if n.startswith("ours-") else None)
            # Paired per round as × floor is: median over rounds of (the other's decode time ÷ this one's).
            for r in rows:
                if r["part"] != "mixed batch":
                    continue
                r["throughput_over_one_adapter"] = paired(res["one-adapter"][1], res[r["provider"]][1])
                if r["provider"].startswith("ours-") and "peft-" + r["provider"][5:] in res:
                    r["peft_time_over_ours"] = paired(res["peft-" + r["provider"][5:]][1], res[r["provider"]][1])
            one_ms = next(r["decode_ms_per_step"] for r in rows if r["provider"] == "one-adapter")
            ceiling = streaming_ceiling(ours, args, one_ms, read_bandwidth(args.device))
    write(args, rows, ceiling)
    return 0


def write(args, rows, ceiling=None):
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda")
              else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    md = [f"Decode, {device}, {args.dtype}, torch {torch.__version__}: Llama {args.layers} layers, hidden "
          f"{args.hidden}, vocab {args.vocab}; adapters r={args.r} on all 7 projections (random A, random nonzero "
          f"B); prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, greedy; {args.rounds} "
          "alternating rounds; × floor = median over rounds of decode time ÷ the floor's in the same round "
          "(min–max over rounds)", "",
          "| part | provider | batch | decode ms/step | decode tok/s | floor | floor tok/s | × floor (min–max) | "
          "÷ one-adapter tok/s | PEFT time ÷ ours | same tokens |",
          "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        md.append(f"| {r['part']} | {r['provider']} | {r['batch']} | {r['decode_ms_per_step']:.2f} | "
                  f"{r['decode_tokens_per_s']:.1f} | {r['floor']} | {r['floor_decode_tokens_per_s']:.1f} | "
                  f"{r['ratio']:.3f} ({r['ratio_min']:.3f}–{r['ratio_max']:.3f}) | "
                  f"{r['throughput_over_one_adapter']:.3f} | " if 'throughput_over_one_adapter' in r else
                  f"| {r['part']} | {r['provider']} | {r['batch']} | {r['decode_ms_per_step']:.2f} | "
                  f"{r['decode_tokens_per_s']:.1f} | {r['floor']} | {r['floor_decode_tokens_per_s']:.1f} | "
                  f"{r['ratio']:.3f} ({r['ratio_min']:.3f}–{r['ratio_max']:.3f}) |  | ")
        md[-1] += (f"{r['peft_time_over_ours']:.2f} | " if "peft_time_over_ours" in r else " | ")
        md[-1] += f"{'' if r['same_tokens'] is None else r['same_tokens']} |"
    if ceiling:
        ks = sorted(ceiling["ceiling"])
        md += ["", f"Weight streaming: one adapter's tensors are {ceiling['adapter_bytes'] / 2**20:.2f} MiB; a batch "
               f"naming K distinct adapters reads (K − 1) × that more per decode step than one adapter does. At the "
               f"read bandwidth of torch.mv over a 256 MiB matrix here ({ceiling['read_bandwidth'] / 2**30:.1f} GiB/s), "
               "and with those reads not overlapping the step's other work, K adapters' throughput ÷ one "
               "adapter's is at most "
               + ", ".join(f"{ceiling['ceiling'][k]:.3f} (K = {k})" for k in ks) + "."]
    text = "\n".join(md)
    print(text)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"infer-{torch.device(args.device).type}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(dict(device=device, torch=torch.__version__, args=vars(args),
                                                        rows=rows, streaming=ceiling), indent=2) + "\n")
    out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
