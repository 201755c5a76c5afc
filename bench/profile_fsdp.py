"""Where a --fsdp rank's memory goes, unit by unit: the bench_fsdp.py run (same base, batch, loop) with
a probe at each FSDP unit's forward and backward boundaries, on one rank.

At every probe it records the RSS now, the peak RSS since the previous probe (VmHWM, reset at each
probe through /proc/self/clear_refs) and FSDP2's own state: which units are whole (their unsharded
parameters allocated) and how many all-gather outputs are alive (a unit's pending all-gather, or the
one FSDP2 keeps after a forward copy-out until the next unit's). Prints the last step's timeline,
MB above the RSS at the step's start, the interval's peak first:

    python bench/profile_fsdp.py --layers 4                 # 2 processes, rank 0's timeline
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench_fsdp import build_inputs, run_flags, train_config  # noqa: E402  (no torch at import)

MB = 2 ** 20


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")           # VmHWM := VmRSS


class Probe:
    """Records (label, RSS MB, peak MB since the previous record, whole units, live all-gather outputs)."""

    def __init__(self, units: dict[str, object]):
        self.units, self.events = units, []
        self.model, self.optimizer = None, None

    def fsdp_state(self) -> tuple[list[str], int, int]:
        whole, results = [], {}
        for name, unit in self.units.items():
            group = unit._get_fsdp_state()._fsdp_param_group
            if group is None:
                continue
            if group.is_unsharded:
                whole.append(name)
            kept = group.comm_ctx.all_gather_state if hasattr(group, "comm_ctx") else None
            for r in (group._all_gather_result, kept and kept.all_gather_result):
                if r is not None:
                    results[id(r)] = r.all_gather_output.untyped_storage().nbytes()
        return whole, len(results), sum(results.values())

    def __call__(self, label: str) -> None:
        whole, gathers, gather_bytes = self.fsdp_state()
        event = {"label": label, "rss": status_mb("VmRSS"), "peak": status_mb("VmHWM"),
                 "whole": whole, "gathers": gathers, "gather_mb": gather_bytes / MB}
        if label == "fwd>root":
            event["tensors"] = live_tensor_mb(self.model, self.optimizer)
        self.events.append(event)
        reset_peak()


def live_tensor_mb(model, optimizer) -> dict[str, float]:
    """MB of the tensors alive now, by what holds them (each storage counted once): the base's shards,
    the adapter, its grads, the optimizer's state, and any other tensor the garbage collector sees."""
    import gc
    import torch
    seen, out = set(), {}

    def add(kind, t):
        t = getattr(t, "_local_tensor", t)
        st = t.untyped_storage()
        if st.data_ptr() and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            out[kind] = out.get(kind, 0.0) + st.nbytes() / MB

    for p in model.parameters():
        add("adapter" if p.requires_grad else "base shard", p)
        if p.grad is not None:
            add("adapter grads", p.grad)
    for b in model.buffers():
        add("buffers", b)
    for state in (optimizer.state.values() if optimizer is not None else ()):
        for t in state.values():
            if isinstance(t, torch.Tensor):
                add("optimizer state", t)
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta:
            add("other tensors", obj)
    return out


def attach(model, probe_holder: list) -> None:
    """Probes at each FSDP unit's pre/post forward and (through tensor hooks on its output and input)
    the start and end of its backward."""
    from torch.distributed.fsdp import FSDPModule
    import torch
    units = {name or "root": m for name, m in model.named_modules() if isinstance(m, FSDPModule)}
    probe = Probe(units)
    probe.model = model
    probe_holder.append(probe)
    short = lambda n: n.replace("model.layers.", "L").replace("model.", "")

    for name, unit in units.items():
        def pre(module, args, kwargs, name=name):
            probe(f"fwd>{short(name)}")
            for t in [*args, *kwargs.values()]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda g, name=name: probe(f"bwd<{short(name)}"))
                    break

        def post(module, args, kwargs, out, name=name):
            probe(f"fwd<{short(name)}")
            t = out[0] if isinstance(out, tuple) else out
            t = t if isinstance(t, torch.Tensor) else getattr(t, "logits", None)
            if isinstance(t, torch.Tensor) and t.requires_grad:
                t.register_hook(lambda g, name=name: probe(f"bwd>{short(name)}"))

        unit.register_forward_pre_hook(pre, with_kwargs=True)
        unit.register_forward_hook(post, with_kwargs=True)


def worker(args) -> None:
    import torch
    from lora.training import loop, train

    probes: list = []
    load = loop.load_base_with_lora

    def load_and_attach(cfg, device, dtype):
        model, params = load(cfg, device, dtype)
        attach(model, probes)
        return model, params

    loop.load_base_with_lora = load_and_attach
    adamw = torch.optim.AdamW

    class RecordedAdamW(adamw):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            probes[0].optimizer = self

    torch.optim.AdamW = RecordedAdamW
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(args.work) / f"profile-{world}"
    train(train_config(args, out, world))
    (out / f"events-{rank}.json").write_text(json.dumps(probes[0].events))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_flags(p)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (default 2; the last is printed)")
    p.add_argument("--_worker", dest="worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    build_inputs(Path(args.work), args.layers)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, "--_worker", *sys.argv[1:]], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-4000:])
    events = json.loads((Path(args.work) / "profile-2" / "events-0.json").read_text())
    starts = [i for i, e in enumerate(events) if e["label"] == "fwd>root"]
    last = events[starts[-1]:]
    floor = last[0]["rss"]
    print(f"rank 0, last step; MB above the RSS at its start ({floor:.0f} MB)")
    print(f"{'probe':<22}{'peak before':>12}{'rss':>8}{'gathers':>9}  whole units")
    for e in last:
        whole = ",".join(n.replace("model.layers.", "L").replace("model.", "") for n in e["whole"])
        print(f"{e['label']:<22}{e['peak'] - floor:>12.0f}{e['rss'] - floor:>8.0f}{e['gathers']:>5} "
              f"{e['gather_mb']:>4.0f}  {whole}")
    print(f"overall peak RSS of the process: {max(e['peak'] for e in events):.0f} MB")
    print("tensors alive at the step's start (MB): " +
          ", ".join(f"{k} {v:.1f}" for k, v in last[0]["tensors"].items()))


if __name__ == "__main__":
    main()
