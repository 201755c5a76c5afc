"""`python train.py` with no --model and no --data: the task of lora/demo/task.py, learned by LoRA.

The demo is a preset of TrainConfig (`DEMO`: the settings it changes; a flag given on the command line
wins). `run_train_demo` builds the base and the task's data in `out`, measures held-out exact match,
trains, and measures again.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

from ..core.inject import select_targets
from ..runtime.device import Device, resolve_device
from ..storage.lock import OutputLock
from ..storage.model_dir import load_model, load_tokenizer, skeleton
from ..training import distributed
from ..training.config import TrainConfig
from ..training.loop import train
from ..training.run_dir import check_out_dir, write_eval
from .tokenizer import char_vocab
from .task import WORD_LEN, build_demo_base, demo_config, exact_match, greedy_complete, heldout_examples, write_task_data

# The demo's settings: TrainConfig's fields and the LoRA flags' (r, lora_alpha) by name.
DEMO = dict(max_seq_len=16, batch_size=32, lr=5e-3, max_steps=60, warmup_steps=3, save_every=20, log_every=5,
            r=16, lora_alpha=32)


def run_train_demo(cfg: TrainConfig) -> dict:
    """Build the base and the task in cfg.out, measure exact match, train, measure again.

    `cfg`'s model/data are ignored: they become <out>/base and <out>/data. Returns eval.json's contents.
    """
    out = Path(cfg.out)
    cfg = replace(cfg, model=str(out / "base"), data=str(out / "data" / "train.jsonl"),
                  eval_data=str(out / "data" / "eval.jsonl"), eval_split=0.0)
    mode = check_out_dir(cfg)                       # before anything is written
    select_targets(skeleton(demo_config(len(char_vocab()))), cfg.lora)
    with contextlib.ExitStack() as hold:
        if distributed.world()[0] == 0:
            hold.enter_context(OutputLock(out))     # held while the base is written, and by the run
        return _build_and_train(cfg, out, mode)


def _build_and_train(cfg: TrainConfig, out: Path, mode: str) -> dict:
    rank, _, local_rank = distributed.world()
    device = resolve_device(cfg.device, local_rank, cfg.hpu_mode, cfg.hpu_graphs)
    if rank == 0 and (mode != "resume" or not (out / "base" / "config.json").is_file()):
        build_demo_base(out / "base")
        write_task_data(out / "data")
    with distributed.process_group(device):
        distributed.barrier()                       # the others wait for rank 0's base and data
        return _measure_and_train(cfg, out, mode, device)


def _measure_and_train(cfg: TrainConfig, out: Path, mode: str, device: Device) -> dict:
    rank = distributed.world()[0]
    if device.name == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # The demo's matrices are 256 wide: too small for a second thread to earn back what it costs
        # in synchronisation (docs/train.md has step times measured both ways).
        torch.set_num_threads(1)
    heldout = heldout_examples()
    tokenizer = load_tokenizer(cfg.model)
    before = None
    if rank == 0:
        base = load_model(cfg.model, device.resolve_dtype(cfg.dtype), quantize=cfg.quantize).to(device.torch_device)
        before = exact_match(base, tokenizer, heldout)
        print(f"held-out exact match before training: {before:.3f}", file=sys.stderr)
        del base

    result = train(cfg, out_mode=mode)
    summary = {}
    if rank == 0:
        after = exact_match(result.model, result.tokenizer, heldout)
        summary = {"step": result.step, "eval_loss": result.eval_loss, "train_loss": result.train_loss,
                   "exact_match_before": before, "exact_match": after, "heldout_examples": len(heldout)}
        write_eval(out, summary)
        examples = greedy_complete(result.model, result.tokenizer, [e["prompt"] for e in heldout[:3]], WORD_LEN + 1)
        for e, got in zip(heldout[:3], examples):
            print(f"  {e['prompt']}{got}   (expected {e['completion']})")
        print(f"held-out exact match: {before:.3f} before, {after:.3f} after {result.step} steps "
              f"(eval loss {result.eval_loss:.4f})")
        print(f"adapter: {out / 'adapter'}   base: {out / 'base'}")
    return summary
