"""A recording fake of Habana's `habana_frameworks` package, for tests only.

It implements the documented calls our code makes (REFERENCE.md §4, Habana's docs) on top of CPU
PyTorch and appends every call to `CALLS` as (name, details), so tests can assert the call protocol:
what was called, in which order, with which arguments. It maps nothing onto real hardware: the tests
point lora.runtime.device's HPU torch.device at the CPU.
"""
import os

CALLS: list[tuple[str, dict]] = []


def record(name: str, **details) -> None:
    CALLS.append((name, details))


def reset() -> None:
    CALLS.clear()


record("import habana_frameworks", PT_HPU_LAZY_MODE=os.environ.get("PT_HPU_LAZY_MODE"))
