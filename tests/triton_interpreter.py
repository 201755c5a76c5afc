"""Imported first by the kernel tests: without a GPU, Triton's CPU interpreter (TRITON_INTERPRET=1) and
lora.kernels imported under it, imported again if this process imported it earlier without."""
import importlib
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import lora.kernels  # noqa: E402

if not ON_GPU and not lora.kernels.launch.INTERPRET:
    # Imported earlier in this process without the interpreter: import again, now interpreted.
    for name in [n for n in sys.modules if n.startswith("lora.kernels")]:
        del sys.modules[name]
    importlib.import_module("lora.kernels")

DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer a launcher allocates for a kernel to fill starts as NaN, so an element a kernel
    forgets to write fails the comparison; returns the shapes allocated, so a test can check it ran.
    Autouse in every test module that imports it."""
    calls = []

    def empty_nan(shape, dtype, device):
        calls.append(shape)
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(lora.kernels.launch, "empty_output", empty_nan)
    return calls
