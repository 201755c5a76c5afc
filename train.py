#!/usr/bin/env python
"""Train a LoRA adapter on a local Llama checkpoint: a thin command line over `lora.training.trainer`.

    python train.py                                   # the demo: build a tiny base, learn a task
    python train.py --model DIR --data FILE [...]     # real models and data
    torchrun --nproc_per_node N train.py ...          # data parallel (gloo on CPU, nccl on CUDA)
"""
from __future__ import annotations

import argparse
import sys

GENERAL_DEFAULTS = dict(max_seq_len=512, batch_size=4, lr=2e-4, max_steps=None, warmup_steps=None,
                        save_every=200, log_every=10, r=8, lora_alpha=16)


def parse_args(argv=None) -> argparse.Namespace:
    from lora.demo.task import DEMO_DEFAULTS

    def default(name: str) -> str:
        g, d = GENERAL_DEFAULTS[name], DEMO_DEFAULTS.get(name, GENERAL_DEFAULTS[name])
        return f"default {g}" + (f"; demo {d}" if d != g else "")

    p = argparse.ArgumentParser(
        description="Train a LoRA adapter. With no --model/--data: the demo (a tiny random Llama "
                    "learns a letter substitution; prints held-out exact match before and after).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    io = p.add_argument_group("model, data and output")
    io.add_argument("--model", help="local Hugging Face Llama directory (config.json, *.safetensors, "
                    "tokenizer); nothing is downloaded. Omit with --data for the demo")
    io.add_argument("--data", help="training data: .jsonl/.json records {text} | {prompt, completion} | "
                    "{instruction, input, output} (alpaca), or .txt (blank-line separated); "
                    "'### Human: … ### Assistant: …' texts train only the replies")
    io.add_argument("--eval-data", help="held-out data file (same formats) for eval_loss")
    io.add_argument("--eval-split", type=float, default=0.0,
                    help="hold out this fraction of --data for evaluation instead (default 0: none)")
    io.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    io.add_argument("--max-seq-len", type=int, help="tokens per example: records are cut/padded to it, "
                    f"or packed into blocks of it ({default('max_seq_len')})")
    io.add_argument("--pack", action="store_true",
                    help="concatenate records into blocks of --max-seq-len instead of padding each")

    lo = p.add_argument_group("LoRA (the fields of LoRAConfig)")
    lo.add_argument("--r", type=int, help=f"adapter rank ({default('r')})")
    lo.add_argument("--lora-alpha", type=float, help=f"scaling = alpha / r ({default('lora_alpha')})")
    lo.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter input (default 0)")
    lo.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                    help="comma-separated module names (suffix match), or all-linear (default: all 7 Llama projections)")
    lo.add_argument("--use-rslora", action="store_true", help="scaling = alpha / sqrt(r)")
    lo.add_argument("--layers-to-transform", help="comma-separated layer indices to adapt (default: all)")
    lo.add_argument("--exclude-modules", help="comma-separated module names (suffix match) never adapted")
    lo.add_argument("--rank-pattern", help='per-module r as JSON, e.g. \'{"down_proj": 16}\'')
    lo.add_argument("--alpha-pattern", help='per-module alpha as JSON, e.g. \'{"down_proj": 32}\'')
    lo.add_argument("--init-lora-weights", default="true", choices=["true", "gaussian", "false"],
                    help="true: kaiming A, zero B (PEFT's default); gaussian: A ~ N(0, 1/r), zero B; "
                         "false: both random (the adapter is not a no-op at step 0)")

    op = p.add_argument_group("optimisation")
    op.add_argument("--batch-size", type=int, help=f"examples per process per micro-batch ({default('batch_size')})")
    op.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    op.add_argument("--lr", type=float, help=f"peak learning rate of AdamW ({default('lr')})")
    op.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on the adapter (default 0)")
    op.add_argument("--warmup-steps", type=int, help="linear warmup steps before the cosine decay "
                    f"(default 5%% of the steps; demo {DEMO_DEFAULTS['warmup_steps']})")
    op.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (default 1; 0: off)")
    op.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs "
                    f"(default: from --epochs; demo {DEMO_DEFAULTS['max_steps']})")
    op.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --max-steps is unset (default 1)")
    op.add_argument("--seed", type=int, default=0, help="seeds the adapter init, data order and dropout (default 0)")

    rt = p.add_argument_group("runtime")
    rt.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "hpu"],
                    help="auto: Gaudi (HPU) when habana_frameworks sees one, else CUDA, else CPU (default auto)")
    rt.add_argument("--hpu-mode", default="lazy", choices=["lazy", "eager"],
                    help="HPU execution mode, set as PT_HPU_LAZY_MODE before any habana import: lazy "
                         "(graphs flushed by mark_step) or eager (+ torch.compile hpu_backend) (default lazy)")
    rt.add_argument("--hpu-graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="HPU Graphs for the training step (ModuleCacher); lazy mode only (default: on in lazy mode)")
    rt.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                    help="base weights and autocast dtype; auto = bf16 on CUDA and HPU, fp32 on CPU (default auto)")
    rt.add_argument("--grad-checkpointing", action="store_true",
                    help="recompute activations in backward: less memory, ~30%% more compute")
    rt.add_argument("--eval-every", type=int, default=0, help="eval loss every N steps (default 0: at the end only)")
    rt.add_argument("--save-every", type=int, help=f"checkpoint every N steps, and always at the end ({default('save_every')})")
    rt.add_argument("--log-every", type=int, help=f"write metrics.jsonl every N steps ({default('log_every')})")
    rt.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default 2)")
    rt.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint "
                    "(same arguments and the same --data/--model contents required)")
    rt.add_argument("--force", action="store_true", help="overwrite a different run in --out")
    rt.add_argument("--no-progress", action="store_true", help="no progress bar")
    rt.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                    help="CPU on Linux/glibc: keep freed memory in the process instead of handing it back "
                         "to the kernel after every step, so steps reuse warm pages instead of page-faulting "
                         "fresh ones (2-5%% faster steps on bench/bench_train.py's model); the process stays "
                         "at its peak memory. Ignored elsewhere (default: on)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace):
    """(TrainConfig, demo?) from the parsed flags; a flag given wins over the (demo) default."""
    from lora import LoRAConfig, LoRAError
    from lora.demo.task import DEMO_DEFAULTS
    from lora.training.trainer import TrainConfig

    demo = args.model is None and args.data is None
    if not demo and (args.model is None or args.data is None):
        raise LoRAError("--model and --data go together (give neither to run the demo)")
    defaults = DEMO_DEFAULTS if demo else GENERAL_DEFAULTS
    value = {k: getattr(args, k) if getattr(args, k) is not None else defaults.get(k, GENERAL_DEFAULTS[k])
             for k in GENERAL_DEFAULTS}
    targets = args.target_modules.strip()
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    lora = LoRAConfig(
        r=value["r"], lora_alpha=value["lora_alpha"], lora_dropout=args.lora_dropout, target_modules=targets,
        use_rslora=args.use_rslora, layers_to_transform=_int_list(args.layers_to_transform, "--layers-to-transform"),
        exclude_modules=_name_list(args.exclude_modules), rank_pattern=_json_dict(args.rank_pattern, "--rank-pattern"),
        alpha_pattern=_json_dict(args.alpha_pattern, "--alpha-pattern"),
        init_lora_weights={"true": True, "false": False, "gaussian": "gaussian"}[args.init_lora_weights])
    cfg = TrainConfig(
        model=args.model or "", data=args.data or "", out=args.out, eval_data=args.eval_data,
        eval_split=args.eval_split, max_seq_len=value["max_seq_len"], pack=args.pack,
        batch_size=value["batch_size"], grad_accum=args.grad_accum, lr=value["lr"],
        weight_decay=args.weight_decay, warmup_steps=value["warmup_steps"], max_grad_norm=args.max_grad_norm,
        max_steps=value["max_steps"], epochs=args.epochs, seed=args.seed, dtype=args.dtype, device=args.device,
        hpu_mode=args.hpu_mode, hpu_graphs=args.hpu_graphs,
        grad_checkpointing=args.grad_checkpointing, eval_every=args.eval_every, save_every=value["save_every"],
        log_every=value["log_every"], keep_checkpoints=args.keep_checkpoints, resume=args.resume,
        force=args.force, progress=not args.no_progress, keep_freed_memory=args.keep_freed_memory, lora=lora)
    return cfg, demo


def _name_list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _int_list(text: str | None, flag: str) -> list[int] | None:
    from lora import LoRAError
    try:
        return [int(t) for t in _name_list(text)] if text else None
    except ValueError:
        raise LoRAError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _json_dict(text: str | None, flag: str) -> dict:
    import json

    from lora import LoRAError
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise LoRAError(f"{flag}: not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise LoRAError(f"{flag} must be a JSON object {{pattern: value}}")
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device in ("auto", "hpu"):
        # Before anything (transformers included) can import habana_frameworks: the lazy/eager
        # default changed between Gaudi releases, so the mode is always set explicitly.
        from lora.runtime.device import set_hpu_mode
        set_hpu_mode(args.hpu_mode)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()          # our own bar is the one that matters
    from lora import LoRAError
    from lora.training.trainer import TrainingDiverged, train
    try:
        cfg, demo = build_config(args)
        if demo:
            from lora.demo.task import run_demo
            run_demo(cfg)
        else:
            result = train(cfg)
            if result.eval_loss is not None:
                print(f"eval loss {result.eval_loss:.4f}")
            print(f"adapter: {result.out / 'adapter'}")
    except LoRAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
