"""lora/training/fingerprint.py: the digests in run.json that let --resume notice changed inputs."""
import hashlib
import os
import shutil

import torch
from safetensors.torch import save_file

from lora.training.fingerprint import SAMPLE_BYTES, SAMPLES, file_sha256, model_digest


def write_model(d, tensors, config='{"hidden_size": 512}'):
    d.mkdir(exist_ok=True)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(config)
    (d / "tokenizer.json").write_text('{"model": {}}')


def test_file_sha256(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(os.urandom(5 << 20) + b"tail")                      # several read chunks
    assert file_sha256(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    assert file_sha256(tmp_path / "missing") is None and file_sha256(tmp_path) is None


def test_model_digest_sees_any_other_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(509, 511, generator=g) for i in range(4)}   # ~4 MB
    assert (tmp_path / "m").exists() is False and model_digest(tmp_path / "m") is None
    write_model(tmp_path / "m", tensors)
    size = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert size > 3 * SAMPLES * SAMPLE_BYTES                        # so the data is sampled, not read whole
    base = model_digest(tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "copy")             # a copy (new mtimes) is the same model
    assert model_digest(tmp_path / "copy") == base
    (tmp_path / "copy" / "generation_config.json").write_text("{}")   # not read by training
    assert model_digest(tmp_path / "copy") == base
    changed = {
        "fine-tuned": {**tensors, "layers.2.weight": tensors["layers.2.weight"] + 1e-3 * torch.randn(509, 511, generator=g)},
        "bf16-rounded": {k: v.bfloat16().float() for k, v in tensors.items()},
        "renamed": {k.replace("layers", "blocks"): v for k, v in tensors.items()},
    }
    for name, other in changed.items():
        write_model(tmp_path / name, other)
        assert model_digest(tmp_path / name) != base, name
    write_model(tmp_path / "config", tensors, config='{"hidden_size": 512, "rope_theta": 1.0}')
    assert model_digest(tmp_path / "config") != base
    (tmp_path / "tok").mkdir()
    shutil.copytree(tmp_path / "m", tmp_path / "tok", dirs_exist_ok=True)
    (tmp_path / "tok" / "tokenizer.json").write_text('{"model": {"x": 1}}')
    assert model_digest(tmp_path / "tok") != base
