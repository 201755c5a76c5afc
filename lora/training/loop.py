"""The LoRA training loop: AdamW on the adapter only, warmup + cosine, checkpoints, resume, data parallel.

One optimizer step:
    G = batch_size · grad_accum · world_size examples (lora/training/schedule.py says which).
    loss = Σ token NLL / (trained tokens in all G examples)    — the same value whether the G examples
    are split over micro-batches or processes; each rank backprops its share and the LoRA grads
    (nothing else has grads) are summed with one all-reduce (lora/training/distributed.py).
    clip to max_grad_norm, AdamW step, scheduler step.
With --fsdp the frozen base is sharded over the processes (lora/training/fsdp.py); the step is the same.

What a run writes under `out`, and how --resume reads it back, is lora/training/run_dir.py.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.inject import apply_lora, lora_layers, select_targets, trainable_parameters
from ..errors import LoRAError, LoRAFailure
from ..runtime.device import Device, resolve_device
from ..runtime.malloc import keep_freed_memory
from ..runtime.progress import Progress
from ..runtime.signals import Interrupted, deferred_interrupts
from ..storage.adapter import save_adapter
from ..storage.lock import OutputLock
from ..storage.model_dir import check_model_dir, enable_checkpointing, load_model, load_tokenizer, skeleton
from . import distributed
from .config import TrainConfig
from .data import IGNORE, TokenizedData, load_dataset, split_eval
from .evaluate import evaluate, token_nll_sum
from .fsdp import check_fsdp, load_sharded_base_with_lora, sharded
from .run_dir import (MetricsLog, TrainState, check_checkpoint, check_out_dir, checkpoint_path, checkpoint_steps,
                      latest_checkpoint, load_checkpoint, run_record, save_checkpoint, start_run, truncate_metrics,
                      write_eval)
from .schedule import Plan, make_scheduler


class TrainingDiverged(LoRAFailure):
    """The loss or gradient became NaN/inf; the message names the last good checkpoint."""


@dataclass
class TrainResult:
    model: torch.nn.Module
    tokenizer: object
    step: int
    train_loss: float | None
    eval_loss: float | None
    out: Path


def train(cfg: TrainConfig, out_mode: str | None = None) -> TrainResult:
    """Run (or resume) training as `cfg` says. Every input is checked before anything is written, and
    the run holds `cfg.out` (lora/storage/lock.py) from its first write to its end.

    `out_mode` skips the output-directory check when the caller made it already (the demo writes
    its base model into `out` first).
    """
    run = check_run(cfg, out_mode)
    with contextlib.ExitStack() as hold:
        hold.enter_context(distributed.process_group(run.device))
        if distributed.world()[0] == 0:
            hold.enter_context(OutputLock(cfg.out))
        return run_checked(run)


@dataclass
class CheckedRun:
    """Everything a run needs, read and checked before anything is written."""
    cfg: TrainConfig
    mode: str                       # check_out_dir's: "fresh", "restart" or "resume"
    record: dict                    # run.json
    device: Device
    dtype: torch.dtype
    tokenizer: object
    data: TokenizedData
    eval_data: TokenizedData | None
    plan: Plan
    resume_from: Path | None        # the checkpoint --resume continues from (checked already)


def check_run(cfg: TrainConfig, out_mode: str | None = None) -> CheckedRun:
    check_inputs(cfg)
    device = resolve_device(cfg.device, distributed.world()[2], cfg.hpu_mode, cfg.hpu_graphs)
    check_fsdp(cfg, device)
    record = run_record(cfg)
    mode = out_mode or check_out_dir(cfg, record)
    resume_from = latest_checkpoint(Path(cfg.out)) if mode == "resume" else None
    if resume_from is not None:
        check_checkpoint(resume_from)
    tokenizer = load_tokenizer(cfg.model)
    data, eval_data = prepare_data(cfg, tokenizer)
    return CheckedRun(cfg, mode, record, device, device.resolve_dtype(cfg.dtype), tokenizer, data, eval_data,
                      Plan.of(cfg, len(data), distributed.world()[1]), resume_from)


def run_checked(run: CheckedRun) -> TrainResult:
    cfg, device, dtype, data, eval_data, plan = run.cfg, run.device, run.dtype, run.data, run.eval_data, run.plan
    rank = distributed.world()[0]
    out = Path(cfg.out)
    if rank == 0:
        start_run(out, run.mode, run.record)
    model, params = load_base_with_lora(cfg, device, dtype)
    optimizer = device.make_optimizer(params, cfg.lr, cfg.adam_betas, cfg.adam_eps, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, plan.warmup, plan.total)
    device.manual_seed(cfg.seed + 1 + rank)      # dropout masks differ between ranks
    state = TrainState()
    if run.resume_from is not None:
        state, rng_states = load_checkpoint(run.resume_from, model, optimizer, scheduler)
        device.set_rng_state(rng_states[rank])
    if run.mode == "resume" and rank == 0:
        truncate_metrics(out, state.step)
    if rank == 0:
        print(trainable_parameters(model), file=sys.stderr)
        print(f"{len(data)} training examples of {cfg.max_seq_len} tokens, {plan.global_batch} per step, "
              f"{plan.total} steps" + (f"; resuming from {run.resume_from}" if run.resume_from else ""), file=sys.stderr)
    if device.name == "cpu" and cfg.keep_freed_memory and not sharded(cfg):
        keep_freed_memory()      # from here on: each step reuses the last one's pages (lora/runtime/malloc.py)

    def checkpoint(state: TrainState) -> Path:
        rng_states = distributed.gather_rng_states(device)      # every rank takes part
        if rank == 0:
            save_checkpoint(out, state, model, optimizer, scheduler, rng_states, cfg.keep_checkpoints)
        return checkpoint_path(out, state.step)

    progress = Progress(plan.total, "train", "step", enabled=cfg.progress and rank == 0, initial=state.step)
    metrics = MetricsLog(out, enabled=rank == 0)
    window = Window()
    # Ctrl-C or SIGTERM: the step in flight finishes, a checkpoint is written, then the run stops.
    with deferred_interrupts() as stop, contextlib.closing(progress), contextlib.closing(metrics):
        for step in range(state.step + 1, plan.total + 1):
            loss, grad_norm, n_tokens = train_step(model, data, plan.micro_batches(step, rank), params, device,
                                                   dtype, cfg.max_grad_norm)
            stop_if_diverged(loss, grad_norm, step, out)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            device.mark_step()                   # lazy mode: the optimizer update is its own graph
            scheduler.step()
            optimizer.zero_grad(set_to_none=device.zero_grad_set_to_none)
            device.mark_step()
            state = TrainState(step, *plan.position(step), loss)
            window.add(loss, n_tokens)

            if step % cfg.log_every == 0 or step == plan.total:
                tokens_per_s = window.tokens_per_s()
                metrics.write(step=step, epoch=state.epoch, loss=window.loss, lr=lr, grad_norm=grad_norm,
                              tokens_per_s=tokens_per_s)
                progress.set(step, force=True, loss=f"{window.loss:.4f}", lr=f"{lr:.2e}",
                             tok_s=f"{tokens_per_s:,.0f}")
                window.restart()
            else:
                progress.set(step)
            signum = distributed.agreed_signal(stop.signum, device)
            with window.paused():                # eval and checkpoint time is not training throughput
                if (eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and step != plan.total
                        and signum is None):
                    metrics.write(step=step, eval_loss=evaluate(model, eval_data, cfg.batch_size, device, dtype))
                if (cfg.save_every and step % cfg.save_every == 0) or step == plan.total or signum is not None:
                    kept = checkpoint(state)
            if signum is not None:
                raise Interrupted(signum, f"checkpoint {kept} (step {step} of {plan.total}) kept; "
                                          "the same command with --resume continues from it")

    try:                                         # the last step's checkpoint is written: say so if stopped
        eval_loss = evaluate(model, eval_data, cfg.batch_size, device, dtype) if eval_data is not None else None
        if rank == 0:
            save_adapter(model, out / "adapter", cfg.lora)
            if eval_data is not None:
                write_eval(out, {"step": state.step, "eval_loss": eval_loss, "train_loss": state.loss})
    except Interrupted as e:
        raise Interrupted(e.signum, f"checkpoint {checkpoint_path(out, state.step)} (the last step) kept; the "
                                    "same command with --resume writes the adapter from it") from None
    distributed.barrier()
    return TrainResult(model, run.tokenizer, state.step, state.loss, eval_loss, out)


# -- before any work ----------------------------------------------------------------------------
def check_inputs(cfg: TrainConfig) -> None:
    """One-line errors for input files that are not there and a model that cannot take the run (too
    short a context, targets that match nothing)."""
    for path in filter(None, (cfg.data, cfg.eval_data)):
        if Path(path).is_dir():
            raise LoRAError(f"{path}: is a directory (expected a data file)")
        if Path(path).is_symlink() and not Path(path).exists():
            raise LoRAError(f"{path}: a symbolic link to nothing (a loop, or its target is gone)")
        if not Path(path).is_file():
            raise LoRAError(f"{path}: no such file")
    limit = check_model_dir(cfg.model).get("max_position_embeddings")
    if limit is not None and cfg.max_seq_len > limit:
        raise LoRAError(f"--max-seq-len {cfg.max_seq_len} exceeds the model's limit "
                        f"(max_position_embeddings = {limit})")
    select_targets(skeleton(cfg.model), cfg.lora)          # a target that matches nothing, before any write


def prepare_data(cfg: TrainConfig, tokenizer) -> tuple[TokenizedData, TokenizedData | None]:
    """(training data, eval data or None): --eval-data, or --eval-split of --data held out."""
    data = load_dataset(cfg.data, tokenizer, cfg.max_seq_len, cfg.pack)
    eval_data = None
    if cfg.eval_data:
        eval_data = load_dataset(cfg.eval_data, tokenizer, cfg.max_seq_len, cfg.pack)
    elif cfg.eval_split:
        data, eval_data = split_eval(data, cfg.eval_split, cfg.seed)
    return data, eval_data


def load_base_with_lora(cfg: TrainConfig, device: Device, dtype: torch.dtype):
    """(model, LoRA parameters): the frozen base in `dtype` on the device, the adapter on it, the same
    initial adapter on every rank. With --fsdp under torchrun, the base sharded over the ranks."""
    if sharded(cfg):
        model = load_sharded_base_with_lora(cfg, device, dtype)
    else:
        model = load_model(cfg.model, dtype, quantize=cfg.quantize).to(device.torch_device)
        device.manual_seed(cfg.seed)
        apply_lora(model, cfg.lora)
    params = [p for layer in lora_layers(model).values() for p in layer.adapter_parameters()]
    distributed.broadcast(params)
    if cfg.grad_checkpointing:
        enable_checkpointing(model)
    model.config.use_cache = False
    model.train()
    return device.prepare_model(model), params


# -- one step ---------------------------------------------------------------------------------
def train_step(model, data: TokenizedData, micro: list[torch.Tensor], params, device: Device,
               dtype: torch.dtype, max_grad_norm: float) -> tuple[float, float, float]:
    """Forward + backward over this rank's micro-batches (rows `micro[a]` of `data`), all-reduce
    and clip the LoRA grads. Returns (global mean token loss, grad norm, global input tokens).

    Each micro-batch's loss is divided by the trained-token count of the whole global batch, so the
    summed grads are those of the global mean, however the batch is split.
    """
    local = torch.tensor([sum((data.labels[i][:, 1:] != IGNORE).sum().item() for i in micro),
                          sum(data.attention_mask[i].sum().item() for i in micro)],
                         dtype=torch.float64, device=device.torch_device)     # counted on the CPU copy
    n_targets, n_tokens = distributed.all_reduce(local).tolist()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device.torch_device)
    for rows in micro:
        b = data.batch(rows, device.torch_device)
        with device.autocast(dtype):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            nll = token_nll_sum(logits, b["labels"])
        (nll / n_targets).backward()
        device.mark_step()
        loss_sum += nll.detach().double()
    distributed.all_reduce_grads(params)
    loss = (distributed.all_reduce(loss_sum) / n_targets).item()
    grad_norm = float(device.clip_grad_norm(params, max_grad_norm))
    return loss, grad_norm, n_tokens


def stop_if_diverged(loss: float, grad_norm: float, step: int, out: Path) -> None:
    """TrainingDiverged, before the optimizer step, when the loss or the gradient norm is not finite."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
    good = checkpoint_steps(out)
    where = (f"the last good checkpoint is {checkpoint_path(out, good[-1])}" if good
             else "no checkpoint was written yet")
    raise TrainingDiverged(f"{what} became {value} at step {step}: training stopped; {where} "
                           "(lower --lr and start again, or --resume)")


class Window:
    """The steps since the last log line: their mean loss and tokens/s, with the time spent on eval
    and checkpoints left out."""

    def __init__(self):
        self.restart()

    def restart(self) -> None:
        self.loss_sum, self.steps, self.tokens, self.t0 = 0.0, 0, 0.0, time.time()

    def add(self, loss: float, tokens: float) -> None:
        self.loss_sum += loss
        self.steps += 1
        self.tokens += tokens

    @property
    def loss(self) -> float:
        return self.loss_sum / self.steps

    def tokens_per_s(self) -> float:
        return self.tokens / max(1e-9, time.time() - self.t0)

    @contextmanager
    def paused(self):
        start = time.time()
        try:
            yield
        finally:
            self.t0 += time.time() - start
