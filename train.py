#!/usr/bin/env python
"""Train a LoRA adapter on a local Llama checkpoint: a thin command line over `lora.training.loop.train`.

    python train.py                                   # the demo: build a tiny base, learn a task
    python train.py --model DIR --data FILE [...]     # real models and data
    torchrun --nproc_per_node N train.py ...          # data parallel (gloo on CPU, nccl on CUDA)

The flags are generated from `TrainConfig` and `LoRAConfig` (lora/training/flags.py).
"""
from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Train a LoRA adapter. With neither --model nor --data: the demo (a tiny random Llama learns a
letter substitution; prints held-out exact match before and after), with the demo's settings where
they differ from the defaults below; a flag given on the command line wins over them.
Under torchrun, spell every flag in full (--lora-r, not --r): torchrun takes a flag that starts
like one of its own options for an abbreviation of it."""


def build_parser() -> argparse.ArgumentParser:
    from lora.demo.train_demo import DEMO
    from lora.training.flags import build_parser
    return build_parser(DESCRIPTION, DEMO)


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_config(args: argparse.Namespace):
    """(TrainConfig, demo?) from the parsed flags; a flag given wins over the demo's settings."""
    from lora.demo.train_demo import DEMO
    from lora.training.flags import config_from_args
    return config_from_args(args, DEMO)


def main(argv=None) -> int:
    from lora.cli import run_main, set_hpu_mode_first
    args = parse_args(argv)
    set_hpu_mode_first(args)                   # before anything imports transformers
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()          # our own bar is the one that matters

    def body() -> None:
        cfg, demo = build_config(args)
        if demo:
            from lora.demo.train_demo import run_train_demo
            run_train_demo(cfg)
            return
        from lora.training.loop import train
        result = train(cfg)
        if result.eval_loss is not None:
            print(f"eval loss {result.eval_loss:.4f}")
        print(f"adapter: {result.out / 'adapter'}")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
