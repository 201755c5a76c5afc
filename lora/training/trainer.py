"""The LoRA training loop: AdamW on the adapter only, warmup + cosine, checkpoints, resume, DDP.

One optimizer step:
    G = batch_size · grad_accum · world_size examples, taken in a per-epoch order that depends only
    on (seed, epoch), so a resumed run replays the same batches.
    loss = Σ token NLL / (trained tokens in all G examples)    — the same value whether the G examples
    are split over micro-batches or processes; each rank backprops its share and the LoRA grads
    (nothing else has grads) are summed with one all-reduce.
    clip to max_grad_norm, AdamW step, scheduler step.

Outputs under `out`: run.json (the arguments that define the run), metrics.jsonl, checkpoints/step-N/
(adapter/, trainer_state.pt with optimizer + scheduler + RNG states, state.json with the data
position), adapter/ (final, PEFT format) and eval.json. Only rank 0 writes. Checkpoints, the
adapter, run.json and eval.json are written atomically (temporary + rename); metrics.jsonl is
appended a line at a time and cut back to the checkpoint's step on resume.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..storage.adapter import load_adapter_tensors, read_adapter_tensors, save_adapter
from ..storage.atomic import atomic_dir, atomic_write_text, clean_stale_in
from ..core.config import LoRAConfig
from .data import IGNORE, TokenizedData, epoch_order, load_dataset, split_eval
from ..runtime.device import Device, resolve_device
from ..errors import LoRAError
from .fingerprint import file_sha256, model_digest
from ..core.inject import apply_lora, lora_layers, trainable_parameters
from ..runtime.malloc import keep_freed_memory

STATE_FILE = "trainer_state.pt"
RUN_FILE = "run.json"
# Arguments that do not change the trained adapter: they may differ when a run is resumed.
_NOT_IN_FINGERPRINT = {"out", "resume", "force", "log_every", "save_every", "eval_every",
                       "keep_checkpoints", "progress", "keep_freed_memory"}


class TrainingDiverged(RuntimeError):
    """The loss or gradient became NaN/inf; the message names the last good checkpoint."""


@dataclass
class TrainConfig:
    """Every setting of a training run (train.py's flags, one to one)."""

    model: str                                   # local Hugging Face model directory
    data: str                                    # .jsonl / .json / .txt
    out: str = "runs/demo"
    eval_data: str | None = None
    eval_split: float = 0.0                      # fraction of `data` held out when no eval_data
    max_seq_len: int = 512
    pack: bool = False
    batch_size: int = 4                          # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int | None = None              # None: 5% of the steps
    max_grad_norm: float = 1.0                   # ≤ 0: no clipping
    max_steps: int | None = None                 # overrides epochs
    epochs: float = 1.0
    seed: int = 0
    dtype: str = "auto"                          # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"                         # auto | cpu | cuda | hpu
    hpu_mode: str = "lazy"                       # HPU: PT_HPU_LAZY_MODE=1 (lazy) or 0 (eager)
    hpu_graphs: bool | None = None               # HPU Graphs (ModuleCacher); None: on in lazy mode
    grad_checkpointing: bool = False
    eval_every: int = 0                          # 0: only at the end
    save_every: int = 200                        # a checkpoint is always written at the end
    log_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = False
    force: bool = False
    progress: bool = True
    keep_freed_memory: bool = True               # CPU + glibc: freed memory stays in the process (lora/runtime/malloc.py)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def fingerprint(self) -> dict:
        """The arguments that define the run's result (plus the process count), as JSON values."""
        d = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_FINGERPRINT}
        d["adam_betas"] = list(self.adam_betas)
        d["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
        return json.loads(json.dumps(d))


# Digests of what the paths point to (lora/training/fingerprint.py), kept in run.json beside the arguments.
_CONTENT_KEYS = {"data_sha256": "--data", "eval_data_sha256": "--eval-data", "model_digest": "--model"}


def run_record(cfg: TrainConfig) -> dict:
    """run.json: the fingerprint of the arguments plus digests of the data and the model they name."""
    return {**cfg.fingerprint(), "data_sha256": file_sha256(cfg.data),
            "eval_data_sha256": file_sha256(cfg.eval_data) if cfg.eval_data else None,
            "model_digest": model_digest(cfg.model)}


def _first_difference(old: dict, new: dict) -> str | None:
    """The first key whose value differs. A digest is compared only when both sides have one: run.json
    files from before the digests, or a path that is not there yet (the demo builds its base later)."""
    for k in sorted(set(old) | set(new)):
        if k in _CONTENT_KEYS and (old.get(k) is None or new.get(k) is None):
            continue
        if old.get(k) != new.get(k):
            return k
    return None


def _changed_input(key: str, old: dict, new: dict, cfg: TrainConfig) -> str:
    """'--data PATH changed since ... (digest A then, B now)' for a digest key."""
    flag = _CONTENT_KEYS[key]
    path = {"--data": cfg.data, "--eval-data": cfg.eval_data, "--model": cfg.model}[flag]
    what = "" if flag != "--model" else " (weights, config or tokenizer)"
    return f"{flag} {path}{what} changed since the run in {cfg.out} began (digest {old[key][:12]} then, {new[key][:12]} now)"


@dataclass
class TrainResult:
    model: torch.nn.Module
    tokenizer: object
    step: int
    train_loss: float | None
    eval_loss: float | None
    out: Path


# -- checks before any work -------------------------------------------------------------------
def read_model_config(model_dir: str) -> dict:
    """config.json of a local HF model dir; one-line errors for what we cannot load."""
    p = Path(model_dir)
    if not p.is_dir():
        raise LoRAError(f"--model {model_dir}: no such directory (a local Hugging Face model directory)")
    if not (p / "config.json").is_file():
        raise LoRAError(f"--model {model_dir}: no config.json (not a Hugging Face model directory)")
    try:
        config = json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoRAError(f"{p / 'config.json'}: not valid JSON ({e})") from None
    if not any(p.glob("*.safetensors")):
        raise LoRAError(f"--model {model_dir}: no *.safetensors weights (pickle .bin files are not loaded)")
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise LoRAError(f"--model {model_dir}: no tokenizer (tokenizer.json) in the model directory")
    return config


def check_out_dir(cfg: TrainConfig, record: dict | None = None) -> str:
    """'fresh', 'restart' (same run, or --force) or 'resume'; an error if `out` holds another run, or
    the same arguments over data or a model whose contents changed. `record`: run_record(cfg)."""
    out = Path(cfg.out)
    run_file = out / RUN_FILE
    if run_file.is_file():
        new = record or run_record(cfg)
        try:
            old = json.loads(run_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        diff = _first_difference(old, new)
        if diff is None:
            return "resume" if cfg.resume else "restart"
        if diff in _CONTENT_KEYS:
            if cfg.force and not cfg.resume:
                return "restart"
            raise LoRAError(f"{'--resume: ' if cfg.resume else ''}{_changed_input(diff, old, new, cfg)}; "
                            + ("resume over the same files, or start over with --force" if cfg.resume else
                               "pass --force to start over, or choose another --out"))
        if cfg.resume:
            raise LoRAError(f"--resume: {out} holds a run with different arguments ({diff}: "
                            f"{old.get(diff)!r} there, {new.get(diff)!r} now); resume with the same arguments")
        if cfg.force:
            return "restart"
        raise LoRAError(f"{out} holds a different run ({diff}: {old.get(diff)!r} there, {new.get(diff)!r} now); "
                        "pass --resume to continue it, --force to overwrite it, or choose another --out")
    if cfg.resume:
        raise LoRAError(f"--resume: {out} holds no training run to resume")
    if out.is_file():
        raise LoRAError(f"--out {out} is a file")
    if out.is_dir() and any(out.iterdir()) and not cfg.force:
        raise LoRAError(f"--out {out} is not empty and holds no training run; choose another --out or pass --force")
    return "fresh"


def check_config(cfg: TrainConfig) -> None:
    for name in ("batch_size", "grad_accum", "max_seq_len", "log_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise LoRAError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("eval_every", "save_every", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise LoRAError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise LoRAError(f"--max-steps must be >= 1, got {cfg.max_steps}")
    if cfg.max_steps is None and not cfg.epochs > 0:
        raise LoRAError(f"--epochs must be > 0, got {cfg.epochs}")
    if not cfg.lr > 0 or not math.isfinite(cfg.lr):
        raise LoRAError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise LoRAError(f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    if cfg.eval_data and cfg.eval_split:
        raise LoRAError("give --eval-data or --eval-split, not both")


# -- schedule ---------------------------------------------------------------------------------
def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup, then cosine to 0.

    step < warmup: (step + 1) / warmup   (the first step already moves; the peak is reached at warmup-1)
    otherwise:     ½ (1 + cos(π · (step − warmup) / (total − warmup)))
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total))


# -- distributed --------------------------------------------------------------------------------
def _world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")))


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the LoRA grads over processes in one flat buffer (the frozen base has no grads)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


# -- loss and eval ----------------------------------------------------------------------------
def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over trained tokens of −log p(label): logits (B, T, V) at t−1 predict labels (B, T) at t."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def evaluate(model, data: TokenizedData, batch_size: int, device: Device, dtype: torch.dtype) -> float:
    """Mean token NLL over `data`. Batches keep one shape: the last is filled with masked rows."""
    rank, world, _ = _world()
    was_training = model.training
    model.eval()
    n = len(data)
    total = torch.zeros(2, dtype=torch.float64, device=device.torch_device)   # (nll sum, tokens)
    for b in range(rank, math.ceil(n / batch_size), world):
        idx = torch.arange(b * batch_size, min((b + 1) * batch_size, n))
        real = idx.numel()
        idx = torch.cat([idx, idx[:1].expand(batch_size - real)])
        batch = data.batch(idx, device.torch_device)
        batch["labels"][real:] = IGNORE
        with device.autocast(dtype):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           use_cache=False).logits
            nll = token_nll_sum(logits, batch["labels"])
        device.mark_step()
        total += torch.stack([nll.double(), (batch["labels"][:, 1:] != IGNORE).sum().double()])
    _all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


# -- checkpoints ------------------------------------------------------------------------------
def checkpoint_steps(out: Path) -> list[int]:
    """Steps of the complete checkpoints in out/checkpoints, oldest first."""
    ckpt = out / "checkpoints"
    if not ckpt.is_dir():
        return []
    steps = []
    for p in ckpt.iterdir():
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and (p / "state.json").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler, rng_states: list[dict],
                    state: dict, keep: int) -> Path:
    """Write checkpoints/step-N atomically, then delete all but the newest `keep`."""
    target = out / "checkpoints" / f"step-{step}"
    with atomic_dir(target) as tmp:
        save_adapter(model, tmp / "adapter")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": rng_states}, tmp / STATE_FILE)
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    for old in checkpoint_steps(out)[:-keep]:
        shutil.rmtree(out / "checkpoints" / f"step-{old}", ignore_errors=True)
    return target


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[dict, list[dict]]:
    """Restore adapter, optimizer and scheduler from `path`; return (state.json, RNG states per rank)."""
    load_adapter_tensors(model, read_adapter_tensors(path / "adapter"), source=str(path / "adapter"))
    blob = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    return json.loads((path / "state.json").read_text()), blob["rng"]


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the metrics of steps ≤ last_step (a killed run may have logged past its checkpoint)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue                       # a line cut short by the kill
        if rec.get("step", 0) <= last_step:
            keep.append(line)
    atomic_write_text(path, "".join(s + "\n" for s in keep))


# -- progress ---------------------------------------------------------------------------------
class Progress:
    """tqdm bar when installed (a plain line per log step otherwise): step, loss, lr, tokens/s, ETA."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None
        self.start, self.initial = time.time(), initial
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                                dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, log: bool) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if log:
                self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        elif log:
            done = step - self.initial
            eta = (time.time() - self.start) / max(1, done) * (self.total - step)
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  "
                  f"ETA {int(eta) // 60}:{int(eta) % 60:02d}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# -- the run ----------------------------------------------------------------------------------
def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)


def load_model(model_dir: str, dtype: torch.dtype, device: Device) -> torch.nn.Module:
    """The frozen base from safetensors only, in `dtype`, on the device; no remote code."""
    import transformers
    from transformers import AutoModelForCausalLM
    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"    # renamed in 4.56
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, local_files_only=True,
                                                 trust_remote_code=False, **{dtype_kw: dtype})
    return model.to(device.torch_device)


def prepare_data(cfg: TrainConfig, tokenizer) -> tuple[TokenizedData, TokenizedData | None]:
    data = load_dataset(cfg.data, tokenizer, cfg.max_seq_len, cfg.pack)
    eval_data = None
    if cfg.eval_data:
        eval_data = load_dataset(cfg.eval_data, tokenizer, cfg.max_seq_len, cfg.pack)
    elif cfg.eval_split:
        data, eval_data = split_eval(data, cfg.eval_split, cfg.seed)
    return data, eval_data


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
    n_targets, n_tokens = _all_reduce(local).tolist()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device.torch_device)
    for rows in micro:
        b = data.batch(rows, device.torch_device)
        with device.autocast(dtype):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
            nll = token_nll_sum(logits, b["labels"])
        (nll / n_targets).backward()
        device.mark_step()
        loss_sum += nll.detach().double()
    _all_reduce_grads(params)
    loss = (_all_reduce(loss_sum) / n_targets).item()
    grad_norm = float(device.clip_grad_norm(params, max_grad_norm))
    return loss, grad_norm, n_tokens


def train(cfg: TrainConfig, out_mode: str | None = None) -> TrainResult:
    """Run (or resume) training as `cfg` says. Every input is checked before anything is written.

    `out_mode` skips the output-directory check when the caller made it already (the demo writes
    its base model into `out` first).
    """
    rank, world, local_rank = _world()
    check_config(cfg)
    for path in filter(None, (cfg.data, cfg.eval_data)):
        if not Path(path).is_file():
            raise LoRAError(f"{path}: no such file")
    model_config = read_model_config(cfg.model)
    limit = model_config.get("max_position_embeddings")
    if limit is not None and cfg.max_seq_len > limit:
        raise LoRAError(f"--max-seq-len {cfg.max_seq_len} exceeds the model's limit "
                        f"(max_position_embeddings = {limit})")
    device = resolve_device(cfg.device, local_rank, cfg.hpu_mode, cfg.hpu_graphs)
    dtype = device.resolve_dtype(cfg.dtype)
    record = run_record(cfg)
    mode = out_mode or check_out_dir(cfg, record)
    tokenizer = load_tokenizer(cfg.model)
    data, eval_data = prepare_data(cfg, tokenizer)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    steps_per_epoch = len(data) // global_batch
    if steps_per_epoch == 0:
        raise LoRAError(f"{cfg.data}: {len(data)} examples, but one step needs {global_batch} "
                        f"(--batch-size × --grad-accum × processes)")
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(0.05 * total)

    # ---- every input is valid: start working ----
    if world > 1 and not dist.is_initialized():
        device.init_process_group()
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if mode != "resume":
            for name in ("checkpoints", "adapter"):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in ("metrics.jsonl", "eval.json"):
                (out / name).unlink(missing_ok=True)
        atomic_write_text(out / RUN_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
        (out / "checkpoints").mkdir(exist_ok=True)
        clean_stale_in(out)                          # what a killed run's writes left (lora/storage/atomic.py)
        clean_stale_in(out / "checkpoints")

    model = load_model(cfg.model, dtype, device)
    device.manual_seed(cfg.seed)                 # same LoRA init on every rank
    apply_lora(model, cfg.lora)
    params = [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    if world > 1:
        for p in params:
            dist.broadcast(p.data, src=0)
    if cfg.grad_checkpointing:
        # Non-reentrant checkpointing restores the RNG state before recomputing, so LoRA dropout
        # draws the same masks twice. (transformers 5 renamed the method.)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    model = device.prepare_model(model)
    optimizer = device.make_optimizer(params, cfg.lr, cfg.adam_betas, cfg.adam_eps, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, warmup, total)
    device.manual_seed(cfg.seed + 1 + rank)      # dropout masks differ between ranks

    start, last_loss, resumed_from = 0, None, None
    if mode == "resume" and checkpoint_steps(out):
        resumed_from = out / "checkpoints" / f"step-{checkpoint_steps(out)[-1]}"
        state, rng_states = load_checkpoint(resumed_from, model, optimizer, scheduler)
        device.set_rng_state(rng_states[rank])
        start, last_loss = state["step"], state["loss"]
    if mode == "resume" and rank == 0:
        _truncate_metrics(out / "metrics.jsonl", start)
    if rank == 0:
        print(trainable_parameters(model), file=sys.stderr)
        print(f"{len(data)} training examples of {cfg.max_seq_len} tokens, {global_batch} per step, "
              f"{total} steps" + (f"; resuming from {resumed_from}" if resumed_from else ""), file=sys.stderr)

    if device.name == "cpu" and cfg.keep_freed_memory:
        keep_freed_memory()      # from here on: each step reuses the last one's pages (lora/runtime/malloc.py)
    progress = Progress(total, start, cfg.progress and rank == 0)
    metrics = open(out / "metrics.jsonl", "a") if rank == 0 else None
    window = {"loss": 0.0, "steps": 0, "tokens": 0.0, "t0": time.time()}
    order_epoch, order = -1, None
    step = start
    try:
        for step in range(start + 1, total + 1):          # `step` counts finished optimizer steps
            epoch, k = divmod(step - 1, steps_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(len(data), cfg.seed, epoch)
            # (grad_accum, world, batch_size): micro-batch a of rank r is idx[a, r]
            idx = order[k * global_batch:(k + 1) * global_batch].view(cfg.grad_accum, world, cfg.batch_size)
            micro = [idx[a, rank] for a in range(cfg.grad_accum)]
            loss, grad_norm, n_tokens = train_step(model, data, micro, params, device, dtype, cfg.max_grad_norm)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
                good = checkpoint_steps(out)
                where = (f"the last good checkpoint is {out / 'checkpoints' / f'step-{good[-1]}'}" if good
                         else "no checkpoint was written yet")
                raise TrainingDiverged(f"{what} became {value} at step {step}: training stopped; {where} "
                                       "(lower --lr and start again, or --resume)")
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            device.mark_step()                   # lazy mode: the optimizer update is its own graph
            scheduler.step()
            optimizer.zero_grad(set_to_none=device.zero_grad_set_to_none)
            device.mark_step()

            last_loss = loss
            window["loss"] += loss
            window["steps"] += 1
            window["tokens"] += n_tokens
            log = step % cfg.log_every == 0 or step == total
            tokens_per_s = window["tokens"] / max(1e-9, time.time() - window["t0"])
            if log and rank == 0:
                metrics.write(json.dumps({"step": step, "epoch": epoch, "loss": window["loss"] / window["steps"],
                                          "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}) + "\n")
                metrics.flush()
            progress.update(step, window["loss"] / window["steps"], lr, tokens_per_s, log)
            if log:
                window = {"loss": 0.0, "steps": 0, "tokens": 0.0, "t0": time.time()}
            paused = time.time()            # eval and checkpoint time is not training throughput
            if eval_data is not None and cfg.eval_every and step % cfg.eval_every == 0 and step != total:
                eval_loss = evaluate(model, eval_data, cfg.batch_size, device, dtype)
                if rank == 0:
                    metrics.write(json.dumps({"step": step, "eval_loss": eval_loss}) + "\n")
                    metrics.flush()
            if (cfg.save_every and step % cfg.save_every == 0) or step == total:
                _save(out, step, model, optimizer, scheduler, device, cfg, epoch, k, last_loss, rank, world)
            window["t0"] += time.time() - paused
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()

    eval_loss = evaluate(model, eval_data, cfg.batch_size, device, dtype) if eval_data is not None else None
    if rank == 0:
        save_adapter(model, out / "adapter", cfg.lora)
        if eval_data is not None:
            atomic_write_text(out / "eval.json", json.dumps(
                {"step": step, "eval_loss": eval_loss, "train_loss": last_loss}, indent=2) + "\n")
    if world > 1:
        dist.barrier()
    return TrainResult(model, tokenizer, step, last_loss, eval_loss, out)


def _save(out, step, model, optimizer, scheduler, device, cfg, epoch, k, loss, rank, world) -> None:
    """Gather every rank's RNG state, then rank 0 writes checkpoints/step-N."""
    rng = [device.rng_state()]
    if world > 1:
        rng = [None] * world
        dist.all_gather_object(rng, device.rng_state())
    if rank == 0:
        state = {"step": step, "epoch": epoch, "batch_in_epoch": k + 1, "loss": loss}
        save_checkpoint(out, step, model, optimizer, scheduler, rng, state, cfg.keep_checkpoints)
