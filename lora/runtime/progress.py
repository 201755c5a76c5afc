"""One progress bar for every long job (training steps, merged bytes, generated prompts).

tqdm draws it when installed; without tqdm a plain line goes to stderr at most once a second (and at
the end) with the count, the rate, the ETA and the job's own figures (loss, lr, tokens/s, …).
"""
from __future__ import annotations

import sys
import time


class Progress:
    """`total` units of work (`unit`: "step", "B", "prompt"), starting from `initial`.

    update(n, **postfix)   n units more; postfix: figures shown beside the bar (loss=…, tok_s=…)
    set(done, **postfix)   the count itself (a resumed run starts past 0)
    force=True             the plain line is printed now, not at most once a second (a log step)
    """

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0,
                 unit_scale: bool = False, min_interval: float = 1.0):
        self.total, self.desc, self.unit, self.enabled = total, desc, unit, enabled
        self.done = self.initial = initial
        self.unit_scale, self.min_interval = unit_scale, min_interval
        self.t0, self.last_print = time.monotonic(), float("-inf")
        self.postfix: dict[str, str] = {}
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale,
                                dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1, force: bool = False, **postfix) -> None:
        self.set(self.done + n, force, **postfix)

    def set(self, done: int, force: bool = False, **postfix) -> None:
        step, self.done = done - self.done, done
        if postfix:
            self.postfix = {k: v for k, v in postfix.items() if v is not None}
        if not self.enabled:
            return
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(step)
            return
        now = time.monotonic()
        if force or now - self.last_print >= self.min_interval or self.done >= self.total:
            self.last_print = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float | None = None) -> str:
        """`desc done/total  k=v …  rate unit/s  ETA m:ss` (the plain form of the bar)."""
        elapsed = max((now or time.monotonic()) - self.t0, 1e-9)
        rate = (self.done - self.initial) / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = f"{int(eta) // 60}:{int(eta) % 60:02d}" if eta != float("inf") else "?"
        figures = "".join(f"  {k} {v}" for k, v in self.postfix.items())
        return (f"{self.desc} {_amount(self.done, self.unit_scale)}/{_amount(self.total, self.unit_scale)}"
                f"{figures}  {_amount(rate, self.unit_scale)} {self.unit}/s  ETA {eta_text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _amount(n: float, scale: bool) -> str:
    if not scale:
        return f"{n:,.0f}" if n >= 10 or n == int(n) else f"{n:.2f}"
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{prefix}"
        n /= 1000
    return f"{n:.1f}P"
