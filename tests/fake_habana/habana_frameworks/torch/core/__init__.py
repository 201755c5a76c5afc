"""habana_frameworks.torch.core: `mark_step` flushes the lazily accumulated graph (lazy mode)."""
import os

from habana_frameworks import record


def mark_step(device_str: str = "", sync: bool = False) -> None:
    record("mark_step", lazy=os.environ.get("PT_HPU_LAZY_MODE"))
