"""`TrainConfig`: every setting of a training run, each field with the help text of its train.py flag.

A field's metadata says what its flag needs (lora/training/flags.py generates the flags from it):

    help       what the setting does (the flag's --help line; the default is appended to it)
    group      the --help section it is listed under
    shown      how the default reads where the value alone does not say it (None: "5% of the steps")
    same_run   True for settings that do not change the trained adapter: a resumed run may change them

The LoRA settings are a `LoRAConfig` (lora/core/config.py), with its own fields and defaults.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

from ..core.config import LoRAConfig
from ..errors import LoRAError

IO, LORA, OPTIM, DEVICE, RUN = ("model, data and output", "LoRA (the fields of LoRAConfig)", "optimisation",
                                "device", "checkpoints, logging and resume")
GROUPS = (IO, LORA, OPTIM, DEVICE, RUN)     # the order of --help's sections


def setting(default=MISSING, *, help: str, group: str, shown: str | None = None, same_run: bool = False,
            default_factory=MISSING):
    """A `TrainConfig` field and what its flag needs (see the module docstring)."""
    return field(default=default, default_factory=default_factory,
                 metadata=dict(help=help, group=group, shown=shown, same_run=same_run))


@dataclass
class TrainConfig:
    """Every setting of a training run: train.py's flags, one to one (lora/training/flags.py)."""

    model: str = setting(help="local Hugging Face Llama directory (config.json, *.safetensors, tokenizer); "
                              "nothing is downloaded", group=IO,
                         shown="none; give neither --model nor --data for the demo")
    data: str = setting(help="training data: .jsonl/.json records {text} | {prompt, completion} | "
                             "{instruction, input, output} (alpaca), or .txt (blank-line separated); "
                             "'### Human: … ### Assistant: …' texts train only the replies", group=IO,
                        shown="none; give neither --model nor --data for the demo")
    out: str = setting("runs/demo", help="output directory", group=IO, same_run=True)
    eval_data: str | None = setting(None, help="held-out data file (same formats) for eval_loss", group=IO)
    eval_split: float = setting(0.0, help="hold out this fraction of --data for evaluation instead", group=IO,
                                shown="0: none")
    max_seq_len: int = setting(512, help="tokens per example: records are cut/padded to it, or packed into "
                                         "blocks of it", group=IO)
    quantize: str | None = setting(None, help="nf4: the base's Linears (all but the output head) quantized to "
                                              "4-bit NF4 while the checkpoint is read, bitsandbytes' format "
                                              "(QLoRA; docs/qlora.md). A bitsandbytes 4-bit checkpoint is 4-bit "
                                              "without it", group=IO, shown="none: the checkpoint as it is")
    pack: bool = setting(False, help="concatenate records into blocks of --max-seq-len instead of padding each",
                         group=IO)

    batch_size: int = setting(4, help="examples per process per micro-batch", group=OPTIM)
    grad_accum: int = setting(1, help="micro-batches per optimizer step", group=OPTIM)
    lr: float = setting(2e-4, help="peak learning rate of AdamW", group=OPTIM)
    weight_decay: float = setting(0.0, help="AdamW weight decay on the adapter", group=OPTIM)
    adam_betas: tuple[float, float] = setting((0.9, 0.999), help="AdamW's beta1,beta2", group=OPTIM)
    adam_eps: float = setting(1e-8, help="AdamW's epsilon", group=OPTIM)
    warmup_steps: int | None = setting(None, help="linear warmup steps before the cosine decay", group=OPTIM,
                                       shown="5% of the steps")
    max_grad_norm: float = setting(1.0, help="clip the gradient norm to this; <= 0: no clipping", group=OPTIM)
    max_steps: int | None = setting(None, help="optimizer steps; overrides --epochs", group=OPTIM,
                                    shown="from --epochs")
    epochs: float = setting(1.0, help="passes over the data when --max-steps is unset", group=OPTIM)
    seed: int = setting(0, help="seeds the adapter init, data order and dropout", group=OPTIM)

    # The flags of these four are lora.cli.add_device_flags' (shared with merge.py and infer.py), with
    # their help there; only --dtype's help is train.py's own.
    dtype: str = setting("auto", help="base weights and autocast dtype; auto = bf16 on CUDA and HPU, fp32 on "
                                      "CPU; the adapter stays fp32", group=DEVICE)
    device: str = setting("auto", help="auto | cpu | cuda | hpu", group=DEVICE)
    hpu_mode: str = setting("lazy", help="HPU: PT_HPU_LAZY_MODE=1 (lazy) or 0 (eager)", group=DEVICE)
    hpu_graphs: bool | None = setting(None, help="HPU Graphs (ModuleCacher); None: on in lazy mode", group=DEVICE)

    grad_checkpointing: bool = setting(False, help="recompute activations in backward: less memory, one more "
                                                   "forward pass of compute", group=RUN)
    fsdp: bool = setting(False, help="under torchrun: shard the frozen base over the processes with FSDP2 "
                                     "(each rank holds and reads about 1/N of it, a 4-bit base's packed weights and "
                                     "scales too) instead of a whole copy on each; the adapter stays replicated. CPU "
                                     "and CUDA, not HPU. One process: the whole base, as without it. "
                                     "The same adapter as without it, bit for bit, so a run may be resumed with "
                                     "or without it (lora/training/fsdp.py, docs/fsdp.md)", group=RUN, same_run=True)
    eval_every: int = setting(0, help="eval loss every N steps", group=RUN, shown="0: at the end only",
                              same_run=True)
    save_every: int = setting(200, help="checkpoint every N steps, and always at the end", group=RUN,
                              same_run=True)
    log_every: int = setting(10, help="write metrics.jsonl every N steps", group=RUN, same_run=True)
    keep_checkpoints: int = setting(2, help="newest checkpoints kept", group=RUN, same_run=True)
    resume: bool = setting(False, help="continue the run in --out from its newest checkpoint (same arguments "
                                       "and the same --data/--model contents required)", group=RUN, same_run=True)
    force: bool = setting(False, help="overwrite a different run in --out", group=RUN, same_run=True)
    progress: bool = setting(True, help="the progress bar (lora/runtime/progress.py)", group=RUN, same_run=True)
    keep_freed_memory: bool = setting(
        True, help="CPU on Linux/glibc: keep freed memory in the process instead of handing it back to the "
                   "kernel after every step, so steps reuse warm pages instead of page-faulting fresh ones "
                   "(lora/runtime/malloc.py; docs/train.md has the gain measured); the process stays at its "
                   "peak memory. Ignored elsewhere and under torchrun --fsdp (whose all-gathered weights would stay "
                   "held: it doubles a rank's peak)", group=RUN, same_run=True)
    lora: LoRAConfig = setting(help="the adapter's hyper-parameters", group=LORA, default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        self.validate()

    def validate(self) -> None:
        """One-line errors, naming the flag, for values no run can use."""
        for name in ("batch_size", "grad_accum", "max_seq_len", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise LoRAError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "weight_decay"):
            if getattr(self, name) < 0:
                raise LoRAError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise LoRAError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.max_steps is None and not self.epochs > 0:
            raise LoRAError(f"--epochs must be > 0, got {self.epochs}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise LoRAError(f"--lr must be a positive number, got {self.lr}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise LoRAError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise LoRAError(f"--adam-betas must be two numbers in [0, 1), got {self.adam_betas}")
        if not self.adam_eps > 0:
            raise LoRAError(f"--adam-eps must be > 0, got {self.adam_eps}")
        if self.quantize not in (None, "nf4"):
            raise LoRAError(f"--quantize must be nf4, got {self.quantize!r}")
        if self.fsdp and self.lora.use_dora:
            raise LoRAError("--use-dora with --fsdp is not supported (the magnitude vector would be sharded "
                            "with the base); use plain torchrun (data parallel)")
        if self.eval_data and self.eval_split:
            raise LoRAError("give --eval-data or --eval-split, not both")

    def fingerprint(self) -> dict:
        """The settings that define the run's result (plus the process count), as JSON values."""
        same_run = {f.name for f in fields(self) if f.metadata["same_run"]}
        d = {k: v for k, v in asdict(self).items() if k not in same_run}
        d["adam_betas"] = list(self.adam_betas)
        d["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
        if not d["lora"]["use_dora"]:       # a later setting: left out at its default, so runs begun
            del d["lora"]["use_dora"]       # before it existed still resume
        return json.loads(json.dumps(d))


def flag(name: str) -> str:
    """The command-line flag of a field: `max_seq_len` -> `--max-seq-len`."""
    return "--" + name.replace("_", "-")
