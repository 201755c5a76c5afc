"""habana_frameworks.torch.hpu.random: the HPU generator's state, as Habana documents it
(get_rng_state / set_rng_state / manual_seed; DeepSpeed's HPU accelerator calls the same three).
The fake keeps a generator of its own and records every call with a digest of the state."""
import hashlib

import torch

from habana_frameworks import record

_generator = torch.Generator()


def digest(state: torch.Tensor) -> str:
    return hashlib.sha256(state.numpy().tobytes()).hexdigest()[:16]


def get_rng_state(device="hpu") -> torch.Tensor:
    state = _generator.get_state()
    record("hpu.random.get_rng_state", digest=digest(state))
    return state


def set_rng_state(new_state: torch.Tensor, device="hpu") -> None:
    record("hpu.random.set_rng_state", digest=digest(new_state), dtype=str(new_state.dtype))
    _generator.set_state(new_state)


def manual_seed(seed: int) -> None:
    record("hpu.random.manual_seed", seed=seed)
    _generator.manual_seed(seed)


def advance(n: int = 1) -> None:
    """What a graph's dropout does to the real generator: moves it on (called by the driver)."""
    torch.rand(n, generator=_generator)
