"""merge_checkpoint / merge.py: exact one-rounding merge, bit-identical copies, crash safety, bad input."""
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lora
from lora.core.delta import Term
from lora import LoRAConfig, LoRAError
from lora.merging.streaming import merge_checkpoint
from lora.merging.verify import VerifyError
from conftest import tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "base_model.model."


# -- builders -----------------------------------------------------------------------------------
def make_base(path: Path, dtype=torch.float32, sharded=False, seed=0, **cfg) -> Path:
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**cfg)).to(dtype).eval()
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "1GB")
    # Stand-ins for tokenizer files: the merge must copy every non-weight file byte for byte.
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
    (path / "tokenizer_config.json").write_text('{"model_max_length": 128}\n')
    return path


def make_adapter(base: Path, path: Path, seed=1, **cfg) -> Path:
    """Our adapter (apply_lora + save_adapter) with random, non-zero B."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    lora.apply_lora(model, LoRAConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, **cfg}))
    lora.save_adapter(model, path)
    return path


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def expected_merge(W, terms, out_dtype=None):
    """The contract: round(fp32(W) + Σ w·(s·fp32(B) @ fp32(A))), deltas summed in order, one rounding."""
    delta = None
    for A, B, s, w in terms:
        d = (B.float() @ A.float()) * s * w
        delta = d if delta is None else delta + d
    return (W.float() + delta).to(out_dtype or W.dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_nothing_written(out: Path):
    assert not out.exists()
    assert not list(out.parent.glob(f".tmp-{out.name}.*"))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One fp32 single-file and one bf16 sharded base, each with an adapter on all seven projections."""
    d = tmp_path_factory.mktemp("merge")
    single = make_base(d / "single")
    sharded = make_base(d / "sharded", dtype=torch.bfloat16, sharded=True, seed=3)
    return {
        "dir": d, "single": single, "sharded": sharded,
        "single_adapter": make_adapter(single, d / "single_adapter"),
        "sharded_adapter": make_adapter(sharded, d / "sharded_adapter", seed=2, r=5, lora_alpha=7),
    }


# -- exactness ----------------------------------------------------------------------------------
def check_exact(base: Path, adapter: Path, out: Path, scaling: float):
    before, after = tensors(base), tensors(out)
    ad = load_file(adapter / "adapter_model.safetensors")
    merged = {k[len(PREFIX):-len(".lora_A.weight")] + ".weight" for k in ad if k.endswith(".lora_A.weight")}
    assert len(merged) == 3 * 7 and merged <= set(before)
    assert set(after) == set(before)
    for name, W in before.items():
        if name in merged:
            m = name[:-len(".weight")]
            want = expected_merge(W, [(ad[f"{PREFIX}{m}.lora_A.weight"], ad[f"{PREFIX}{m}.lora_B.weight"], scaling, 1.0)])
            assert same_bits(after[name], want), name
            assert not torch.equal(after[name], W), name           # the adapter really changed it
        else:
            assert same_bits(after[name], W), name
    for side in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / side).read_bytes() == (base / side).read_bytes(), side
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            assert fh.metadata() == {"format": "pt"}


def test_sharded_bf16_exact_and_index(work, tmp_path):
    base, out = work["sharded"], tmp_path / "out"
    report = merge_checkpoint(base, work["sharded_adapter"], out, progress=False)
    check_exact(base, work["sharded_adapter"], out, 7 / 5)
    assert report.n_merged == 21
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 3 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    for name in shards:                      # same sharding: each shard holds the same tensors, same order
        with safe_open(base / name, "pt") as a, safe_open(out / name, "pt") as b:
            assert list(a.keys()) == list(b.keys())
    index_in = json.loads((base / "model.safetensors.index.json").read_text())
    index_out = json.loads((out / "model.safetensors.index.json").read_text())
    assert index_out["weight_map"] == index_in["weight_map"]
    total = sum(t.numel() * t.element_size() for t in tensors(out).values())
    assert index_out["metadata"]["total_size"] == total == report.bytes_written
    assert not list(tmp_path.glob(".tmp-*"))                 # no temporaries left beside out


def test_single_fp32_exact_equals_our_layer_merge_and_loads(work, tmp_path):
    from transformers import AutoModelForCausalLM
    base, adapter, out = work["single"], work["single_adapter"], tmp_path / "out"
    merge_checkpoint(base, adapter, out, progress=False)
    check_exact(base, adapter, out, 8 / 4)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())

    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(5))
    unmerged = lora.load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval(), adapter)
    with torch.no_grad():
        want = unmerged(input_ids=ids).logits
        merged_model = AutoModelForCausalLM.from_pretrained(out).eval()
        got = merged_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Our in-memory merge (LoRALinear.merge) gives the very same bits as the streaming merge.
    lora.merge_lora(unmerged)
    ours = merged_model.state_dict()
    for name, p in unmerged.state_dict().items():
        assert same_bits(ours[name], p), name


def test_zero_B_adapter_leaves_every_tensor_bit_identical(work, tmp_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(work["sharded"])
    lora.apply_lora(model, LoRAConfig(r=3, lora_alpha=5))            # PEFT init: B = 0
    lora.save_adapter(model, tmp_path / "zero")
    merge_checkpoint(work["sharded"], tmp_path / "zero", tmp_path / "out", progress=False)
    before, after = tensors(work["sharded"]), tensors(tmp_path / "out")
    assert all(same_bits(after[k], v) for k, v in before.items())


def test_weighted_multi_adapter_with_rslora_and_partial_targets(work, tmp_path):
    base, a1 = work["sharded"], work["sharded_adapter"]
    a2 = make_adapter(base, tmp_path / "a2", seed=7, r=6, lora_alpha=3, use_rslora=True,
                      target_modules=["q_proj", "down_proj"])
    out = tmp_path / "out"
    report = merge_checkpoint(base, [a1, a2], out, weights=[0.7, -0.3], progress=False, verify=True)
    assert report.max_abs_diff <= report.tolerance < report.adapter_effect
    before, after = tensors(base), tensors(out)
    t1, t2 = load_file(a1 / "adapter_model.safetensors"), load_file(a2 / "adapter_model.safetensors")
    n_merged = 0
    for name, W in before.items():
        m = PREFIX + name[:-len(".weight")]
        terms = [(t[f"{m}.lora_A.weight"], t[f"{m}.lora_B.weight"], s, w)
                 for t, s, w in ((t1, 7 / 5, 0.7), (t2, 3 / math.sqrt(6), -0.3)) if f"{m}.lora_A.weight" in t]
        if terms:
            n_merged += 1
            assert same_bits(after[name], expected_merge(W, terms)), name
        else:
            assert same_bits(after[name], W), name
    assert n_merged == report.n_merged == 21


def test_peft_written_adapter_rslora_patterns_half_precision(work, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM
    base = work["single"]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, use_rslora=True, init_lora_weights=False,
                          target_modules=["q_proj", "v_proj", "up_proj"],
                          rank_pattern={"q_proj": 6}, alpha_pattern={"v_proj": 3})
    torch.manual_seed(11)
    pm = peft.get_peft_model(model, cfg)
    scalings = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "scaling", {}):
            scalings[name.removeprefix("base_model.model.")] = mod.scaling["default"]
            # A in fp16, B in bf16: PEFT saves each tensor in its own dtype.
            mod.lora_A["default"].weight.data = mod.lora_A["default"].weight.data.to(torch.float16)
            mod.lora_B["default"].weight.data = mod.lora_B["default"].weight.data.to(torch.bfloat16)
    pm.save_pretrained(tmp_path / "peft_adapter")
    ad = load_file(tmp_path / "peft_adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in ad.values()} == {torch.float16, torch.bfloat16}
    assert math.isclose(scalings["model.layers.0.self_attn.q_proj"], 16 / math.sqrt(6))
    assert math.isclose(scalings["model.layers.0.self_attn.v_proj"], 3 / math.sqrt(4))

    out = tmp_path / "out"
    merge_checkpoint(base, tmp_path / "peft_adapter", out, progress=False)
    before, after = tensors(base), tensors(out)
    for name, W in before.items():
        m = name[:-len(".weight")]
        if m in scalings:
            A, B = ad[f"{PREFIX}{m}.lora_A.weight"], ad[f"{PREFIX}{m}.lora_B.weight"]
            assert same_bits(after[name], expected_merge(W, [(A, B, scalings[m], 1.0)])), name
        else:
            assert same_bits(after[name], W), name
    assert len(scalings) == 9


def test_dtype_converts_every_float_tensor_and_config(work, tmp_path):
    base, adapter, out = work["single"], work["single_adapter"], tmp_path / "out"
    report = merge_checkpoint(base, adapter, out, dtype="bfloat16", progress=False, verify=True)
    assert report.max_abs_diff <= report.tolerance
    before, after = tensors(base), tensors(out)
    ad = load_file(adapter / "adapter_model.safetensors")
    for name, W in before.items():
        m = PREFIX + name[:-len(".weight")]
        if f"{m}.lora_A.weight" in ad:
            want = expected_merge(W, [(ad[f"{m}.lora_A.weight"], ad[f"{m}.lora_B.weight"], 2.0, 1.0)], torch.bfloat16)
        else:
            want = W.to(torch.bfloat16)
        assert same_bits(after[name], want), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# -- crash safety, overwrite, verify ------------------------------------------------------------
# Runs a merge that signals `ready` (creates the file) and then sleeps once its first tensor's bytes
# are written, so that a SIGKILL lands mid-merge: the shard writes are wrapped, not the package.
HOLD_AFTER_FIRST_TENSOR = """
import sys, time
from pathlib import Path
import lora.merging.writer as writer
from lora.merging.streaming import merge_checkpoint
base, adapter, out, ready = sys.argv[1:]

def hold_after(write):                           # write_all(fd, data) or copy_bytes(src, dst, ...)
    def wrapped(*args):
        write(*args)
        if not isinstance(args[1], bytes):       # a tensor's bytes (merged or copied), not a shard header
            Path(ready).touch()
            time.sleep(600)
    return wrapped

writer.write_all, writer.copy_bytes = hold_after(writer.write_all), hold_after(writer.copy_bytes)
merge_checkpoint(base, adapter, out, progress=False)
"""


def test_sigkill_mid_merge_leaves_no_out_and_next_run_cleans_up(work, tmp_path):
    out, ready = tmp_path / "out", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_AFTER_FIRST_TENSOR, str(work["sharded"]),
                             str(work["sharded_adapter"]), str(out), str(ready)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "merge never reached its first tensor"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    stale = list(tmp_path.glob(".tmp-out.*"))
    assert len(stale) == 1 and any(stale[0].glob("*.safetensors"))      # killed with a partial shard
    merge_checkpoint(work["sharded"], work["sharded_adapter"], out, progress=False)
    assert not list(tmp_path.glob(".tmp-out.*"))
    check_exact(work["sharded"], work["sharded_adapter"], out, 7 / 5)


def test_existing_out_needs_force_and_force_replaces(work, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(LoRAError, match="already exists"):
        merge_checkpoint(work["single"], work["single_adapter"], out, progress=False)
    assert (out / "old.txt").exists()
    merge_checkpoint(work["single"], work["single_adapter"], out, force=True, progress=False)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()


def test_a_merge_killed_between_its_renames_leaves_out_to_force(work, tmp_path):
    """A --force merge killed after moving the old out aside, before moving the new one in: the next
    merge puts the old out back first, so it still needs --force to replace it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    out.rename(tmp_path / ".old-out.k1ll3d00")             # what the killed merge left
    (tmp_path / ".tmp-out.k1ll3d01").mkdir()
    with pytest.raises(LoRAError, match="already exists"):
        merge_checkpoint(work["single"], work["single_adapter"], out, progress=False)
    assert (out / "old.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_verify_catches_a_wrong_merge_and_writes_nothing(work, tmp_path, monkeypatch):
    import lora.merging.writer as writer
    right = writer.merged_weight
    monkeypatch.setattr(writer, "merged_weight",                   # a merge with a 1% scaling error
                        lambda W, terms, *args: right(W, [Term(u.lora_A, u.lora_B, u.scaling * 1.01, u.weight)
                                                          for u in terms], *args))
    out = tmp_path / "out"
    with pytest.raises(VerifyError, match="exceeds the tolerance"):
        merge_checkpoint(work["single"], work["single_adapter"], out, progress=False, verify=True)
    assert_nothing_written(out)


# -- bad input: one-line LoRAError, nothing written --------------------------------------------
def _edit_adapter(src: Path, dst: Path, config=None, tensors_fn=None) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    t = load_file(src / "adapter_model.safetensors")
    save_file(tensors_fn(t) if tensors_fn else t, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


def _copy_base(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _shard(d: Path) -> Path:
    return sorted(d.glob("model-*.safetensors"))[1]


def _rename_keys(t, old, new):
    return {k.replace(old, new): v for k, v in t.items()}


BAD = {
    "shape": (lambda w, d: (w["sharded"], make_adapter(make_base(d / "wide", hidden_size=64, num_attention_heads=8),
                                                       d / "wide_adapter")),
              r"down_proj\.lora_B\.weight has shape \(64, 4\) but base weight model\.layers\.0\.mlp\.down_proj\.weight "
              r"has shape \(48, 84\)"),
    "absent": (lambda w, d: (w["single"], _edit_adapter(w["single_adapter"], d / "a", tensors_fn=lambda t: _rename_keys(
        t, "layers.2.mlp.up_proj", "layers.2.mlp.upp_proj"))), "target module model.layers.2.mlp.upp_proj is not in the base"),
    "half_pair": (lambda w, d: (w["single"], _edit_adapter(w["single_adapter"], d / "a", tensors_fn=lambda t: {
        k: v for k, v in t.items() if k != f"{PREFIX}model.layers.1.self_attn.k_proj.lora_B.weight"})),
        "k_proj has no lora_B.weight"),
    "rank": (lambda w, d: (w["single"], _edit_adapter(w["single_adapter"], d / "a", config={"rank_pattern": {"o_proj": 2}})),
             r"o_proj\.lora_A\.weight has shape \(4, 48\).*needs \(2, 48\) at r=2"),
    "dora": (lambda w, d: (w["single"], _edit_adapter(w["single_adapter"], d / "a", config={"use_dora": True})),
             "has no lora_magnitude_vector"),
    "bias": (lambda w, d: (w["single"], _edit_adapter(w["single_adapter"], d / "a", config={"bias": "all"})),
             "bias='all' is not supported"),
    "truncated": (lambda w, d: (_truncate(_copy_base(w["sharded"], d / "b")), w["sharded_adapter"]),
                  "corrupt or truncated safetensors file"),
    "corrupt_header": (lambda w, d: (_garble(_copy_base(w["sharded"], d / "b")), w["sharded_adapter"]),
                       "header is not JSON"),
    "missing_index_entry": (lambda w, d: (_drop_index_entry(_copy_base(w["sharded"], d / "b")), w["sharded_adapter"]),
                            "missing index entry for tensor model.layers.0.input_layernorm.weight"),
    "missing_shard": (lambda w, d: (_delete_shard(_copy_base(w["sharded"], d / "b")), w["sharded_adapter"]),
                      r"shard model-00002-of-\d+\.safetensors is missing"),
    "no_checkpoint": (lambda w, d: (d, w["single_adapter"]), "no model.safetensors or model.safetensors.index.json"),
}


def _truncate(base: Path) -> Path:
    f = _shard(base)
    f.write_bytes(f.read_bytes()[:-10])
    return base


def _garble(base: Path) -> Path:
    f = _shard(base)
    raw = bytearray(f.read_bytes())
    raw[8:16] = b"\xff" * 8
    f.write_bytes(bytes(raw))
    return base


def _drop_index_entry(base: Path) -> Path:
    p = base / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    del index["weight_map"]["model.layers.0.input_layernorm.weight"]
    p.write_text(json.dumps(index))
    return base


def _delete_shard(base: Path) -> Path:
    _shard(base).unlink()
    return base


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_error_and_writes_nothing(work, tmp_path, case):
    make, message = BAD[case]
    base, adapter = make(work, tmp_path)
    out = tmp_path / "out"
    with pytest.raises(LoRAError, match=message) as e:
        merge_checkpoint(base, adapter, out, progress=False)
    assert "\n" not in str(e.value)
    assert_nothing_written(out)


def test_bad_arguments(work, tmp_path):
    single, adapter = work["single"], work["single_adapter"]
    with pytest.raises(LoRAError, match="is the base checkpoint itself"):
        merge_checkpoint(single, adapter, single, force=True, progress=False)
    with pytest.raises(LoRAError, match="contains the input"):
        merge_checkpoint(single, adapter, single.parent, force=True, progress=False)
    with pytest.raises(LoRAError, match="1 weight"):
        merge_checkpoint(single, [adapter, adapter], tmp_path / "o", weights=[1.0], progress=False)
    with pytest.raises(LoRAError, match="dtype 'int8'"):
        merge_checkpoint(single, adapter, tmp_path / "o", dtype="int8", progress=False)
    assert_nothing_written(tmp_path / "o")


def _cli():
    import importlib.util
    spec = importlib.util.spec_from_file_location("merge_cli", ROOT / "merge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_merges_and_reports_errors_on_one_line(work, tmp_path, capsys):
    cli = _cli()
    out = tmp_path / "out"
    args = ["--base", str(work["single"]), "--adapter", str(work["single_adapter"]), "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    assert "merged 21 of" in capsys.readouterr().out
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "already exists" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--base", "--adapter", "--weights", "--out", "--dtype", "--force", "--verify", "--no-progress"):
        assert flag in help_text
