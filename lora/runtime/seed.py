"""Seeds drawn on the host, for LoRA dropout (plain op and Triton kernels) and for sampling."""
from __future__ import annotations

import torch


def new_seed() -> int:
    """A 62-bit seed from torch's global CPU generator, so `torch.manual_seed` governs it and a
    checkpointed RNG state reproduces it (Philox takes it as a 64-bit key). CPU only: no device
    synchronisation."""
    return int(torch.randint(0, 2**62, (1,)).item())
