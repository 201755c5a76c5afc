"""The run directory (`--out`): what a run writes there, and how the next run reads it back.

    run.json              the fingerprint of the settings plus digests of the data and model files
                          (lora/training/fingerprint.py): check_out_dir compares it with a new run's
    metrics.jsonl         one JSON line per log step (and eval); cut back to the checkpoint's step on resume
    checkpoints/step-N/   adapter/ (PEFT format), trainer_state.pt (optimizer, scheduler, every rank's
                          RNG states), state.json (TrainState: the data position)
    adapter/              the final adapter
    eval.json             the final losses (the demo adds its exact match)

Only rank 0 writes. Checkpoints, the adapter, run.json and eval.json are written atomically
(temporary + rename, lora/storage/atomic.py); metrics.jsonl is appended a line at a time.
"""
from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import LoRAError
from ..storage.adapter import check_finite, load_adapter_tensors, read_adapter_tensors, save_adapter
from ..storage.atomic import atomic_dir, atomic_write_text, clean_stale_in, write_bytes
from .config import TrainConfig
from .fingerprint import file_sha256, model_digest

RUN_FILE, METRICS_FILE, EVAL_FILE = "run.json", "metrics.jsonl", "eval.json"
STATE_FILE = "trainer_state.pt"
# Digests of what the paths point to, kept in run.json beside the settings, and the flag of each.
_CONTENT_KEYS = {"data_sha256": "--data", "eval_data_sha256": "--eval-data", "model_digest": "--model"}


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint's state.json holds and what --resume starts from."""

    step: int = 0                   # finished optimizer steps
    epoch: int = 0                  # the epoch of the last step
    batch_in_epoch: int = 0         # steps of that epoch done
    loss: float | None = None       # the last step's loss


# -- run.json: is `out` this run, another one, or none? -------------------------------------------
def run_record(cfg: TrainConfig) -> dict:
    """run.json: the fingerprint of the settings plus digests of the data and the model they name."""
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


def check_out_dir(cfg: TrainConfig, record: dict | None = None) -> str:
    """'fresh', 'restart' (same run, or --force) or 'resume'; an error if `out` holds another run, or
    the same settings over data or a model whose contents changed. `record`: run_record(cfg)."""
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


def start_run(out: Path, mode: str, record: dict) -> None:
    """Rank 0, once every input is checked: a new run clears the last one's outputs (a resumed run
    keeps them), run.json is (re)written, and what a killed run's writes left is removed."""
    out.mkdir(parents=True, exist_ok=True)
    if mode != "resume":
        for name in ("checkpoints", "adapter"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (METRICS_FILE, EVAL_FILE):
            (out / name).unlink(missing_ok=True)
    atomic_write_text(out / RUN_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    (out / "checkpoints").mkdir(exist_ok=True)
    clean_stale_in(out)
    clean_stale_in(out / "checkpoints")


def write_eval(out: Path, summary: dict) -> None:
    atomic_write_text(out / EVAL_FILE, json.dumps(summary, indent=2) + "\n")


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


def checkpoint_path(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step}"


def latest_checkpoint(out: Path) -> Path | None:
    steps = checkpoint_steps(out)
    return checkpoint_path(out, steps[-1]) if steps else None


def check_checkpoint(path: Path) -> None:
    """A one-line error when the checkpoint's adapter cannot be resumed from (unreadable, non-finite)."""
    for key, t in read_adapter_tensors(path / "adapter").items():
        check_finite(t, key, str(path / "adapter"))


def save_checkpoint(out: Path, state: TrainState, model, optimizer, scheduler, rng_states: list[dict],
                    keep: int) -> Path:
    """Write checkpoints/step-N atomically, then delete all but the newest `keep`."""
    target = checkpoint_path(out, state.step)
    with atomic_dir(target) as tmp:
        save_adapter(model, tmp / "adapter")
        blob = io.BytesIO()          # written by write_bytes: a full disk is an OSError naming the file
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states}, blob)
        write_bytes(tmp / STATE_FILE, blob.getvalue())
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
    for old in checkpoint_steps(out)[:-keep]:
        shutil.rmtree(checkpoint_path(out, old), ignore_errors=True)
    return target


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[TrainState, list[dict]]:
    """Restore adapter, optimizer and scheduler from `path`; return (its TrainState, RNG states per rank)."""
    load_adapter_tensors(model, read_adapter_tensors(path / "adapter"), source=str(path / "adapter"))
    blob = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    return TrainState(**json.loads((path / "state.json").read_text())), blob["rng"]


# -- metrics.jsonl ----------------------------------------------------------------------------
def truncate_metrics(out: Path, last_step: int) -> None:
    """Keep the metrics of steps ≤ last_step (a killed run may have logged past its checkpoint)."""
    path = out / METRICS_FILE
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


class MetricsLog:
    """metrics.jsonl, appended a line at a time (and flushed: a kill loses at most the line being
    written). Writes nothing when not `enabled` (ranks other than 0)."""

    def __init__(self, out: Path, enabled: bool):
        self.path = out / METRICS_FILE
        self.file = open(self.path, "a") if enabled else None

    def write(self, **record) -> None:
        if self.file is not None:
            try:
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()
            except OSError as e:         # a full disk: name the file
                raise OSError(e.errno, e.strerror, str(self.path)) from None

    def close(self) -> None:
        if self.file is not None:
            try:
                self.file.close()
            except OSError:              # what a failed write left buffered; that error is raised already
                pass
            self.file = None
