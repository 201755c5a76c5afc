"""Runs train.py / infer.py against the recording fake of habana_frameworks (tests/fake_habana).

    python tests/gaudi_driver.py OUT.json train|infer [script args...]

The fake is put on sys.path, lora.runtime.device's HPU torch.device is pointed at the CPU (the only
mapping the fake needs), and a few torch entry points are wrapped so that the fake's ordered call log
also shows backward passes, torch.compile and autocast. The log is written to OUT.json, with the
script's exit code.
"""
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "fake_habana"))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

import lora.runtime.device  # noqa: E402  (imports no habana module)
import lora.core.op  # noqa: E402  (the one module that draws LoRA dropout seeds on the host)

lora.runtime.device.HPU_TORCH_DEVICE = torch.device("cpu")


def record(name, **details):
    fake = sys.modules.get("habana_frameworks")
    if fake is None:                # nothing imported habana yet: keep the event anyway
        PRE.append((name, details))
    else:
        fake.record(name, **details)


PRE = []
_backward = torch.Tensor.backward


def backward(self, *args, **kwargs):
    out = _backward(self, *args, **kwargs)
    record("backward")
    hpu_random = sys.modules.get("habana_frameworks.torch.hpu.random")
    if hpu_random is not None:
        hpu_random.advance()       # the device generator moves on, as graph dropout moves it on a Gaudi
    return out


torch.Tensor.backward = backward


def compile_(model, *args, backend="inductor", **kwargs):
    record("torch.compile", backend=backend)
    return model        # the fake runs the model eagerly


torch.compile = compile_
_autocast = torch.autocast


class autocast(_autocast):
    def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
        if device_type == "hpu":
            record("autocast", device_type=device_type, dtype=str(dtype), enabled=enabled)
        super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)


torch.autocast = autocast
_new_seed = lora.core.op.new_seed


def new_seed():
    record("host_seed")                   # a host-side dropout seed: would be frozen into a graph
    return _new_seed()


lora.core.op.new_seed = new_seed


def main():
    out, script, *argv = sys.argv[1:]
    sys.argv = [f"{script}.py", *argv]
    os.chdir(HERE.parent)
    module = __import__(script)
    code = module.main(argv)
    fake = sys.modules.get("habana_frameworks")
    calls = PRE + (fake.CALLS if fake else [])
    Path(out).write_text(json.dumps({"exit": code, "calls": calls}, default=str))


if __name__ == "__main__":
    main()
