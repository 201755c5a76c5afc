"""bench/bench_train.py: runs end to end on a small config and writes what the README table reads."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_train  # noqa: E402


def test_bootstrap_interval_brackets_the_median():
    ratios = [1.0, 1.1, 0.9, 1.05, 1.2, 0.95, 1.02, 1.07]
    lo, hi = bench_train.bootstrap_ci(ratios)
    med = sorted(ratios)[len(ratios) // 2 - 1: len(ratios) // 2 + 1]
    assert min(ratios) <= lo <= sum(med) / 2 <= hi <= max(ratios)
    assert bench_train.bootstrap_ci(ratios) == [lo, hi]                 # seeded: reproducible
    assert bench_train.bootstrap_ci([1.03] * 5) == [1.03, 1.03]


def test_small_run_writes_json_and_table(tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "train.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--layers", "1", "--batch", "1", "--seq", "16",
           "--steps", "3", "--warmup", "1", "--dropout", "0.1", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["device"].startswith("cpu") and d["tokens_per_step"] == 16 and d["config"]["dropout"] == 0.1
    rows = {row["provider"]: row for row in d["results"]}
    assert set(rows) == {"floor", "peft", "ours"}
    for name, row in rows.items():
        assert len(row["steps"]) == 3 and row["min_step_s"] <= row["step_s"]
        assert row["tokens_per_s"] == pytest.approx(16 / row["step_s"])
        assert 0 < row["step_mb"] < row["peak_mb"]
        assert 0 < row["tensor_step_mb"] < row["tensor_peak_mb"] < row["peak_mb"]     # tensors are part of RSS
        if name != "floor":
            lo, hi = row["ratio_to_floor_ci95"]
            assert lo <= row["ratio_to_floor"] <= hi
    assert rows["floor"]["ratio_to_floor"] == 1.0 and rows["floor"]["ratio_to_floor_ci95"] is None
    assert rows["peft"]["speedup_vs_peft"] == 1.0 and rows["peft"]["peak_vs_peft"] == 1.0
    assert "| ours |" in r.stdout and "95% bootstrap interval" in r.stdout and "peak tensor memory" in r.stdout


def test_tensor_peak_counts_what_a_run_holds_at_once():
    def run():
        a = torch.empty(3 * 2**20, dtype=torch.uint8)     # 3 MiB
        b = torch.empty(5 * 2**20, dtype=torch.uint8)     # 5 MiB, both held: 8 MiB
        del a, b
        c = torch.empty(6 * 2**20, dtype=torch.uint8)     # 6 MiB alone
        del c
    assert 8 <= bench_train.tensor_peak_rise_mb(run) < 8.01
    keep = torch.empty(4 * 2**20, dtype=torch.uint8)
    assert bench_train.live_tensor_mb() >= 4
    del keep


def test_profile_train_lists_ops_of_both_providers(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "profile_train.py"), "--layers", "1", "--batch", "1", "--seq", "16",
           "--rounds", "1", "--top", "200", "--dropout", "0.1", "--by-shape"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith("| aten::")]
    ops = {row[0][2:]: row for row in rows}
    assert float(ops["aten::addmm_"][1]) == 0 < float(ops["aten::addmm_"][2])    # only ours accumulates
    assert "floor: " in r.stdout and "ours: " in r.stdout and "minor page faults per step" in r.stdout
    floor, ours = r.stdout.split("floor: GEMMs by operand shapes")[1].split("ours: GEMMs by operand shapes")
    shrink = "aten::mm [[16, 1024], [1024, 48]]"             # q/k/v's shared shrink (Σr = 48): ours only
    assert shrink in ours and shrink not in floor and "aten::addmm_ [[16, 1024]" in ours


def test_thin_gemms_counts_the_adapters_flops(capsys):
    """bench/thin_gemms.py: the adapter's FLOPs per group as counted by hand, and a table of the four groups."""
    import thin_gemms
    row = thin_gemms.measure("q/k/v", 40, [40, 8, 8], M=12, r=3, rounds=1)
    assert row["flop_share"] == 6 * 12 * 3 * (3 * 40 + 56) / (4 * 12 * 40 * 56)
    assert set(row["parts"]) == {"torch", "thin"}
    assert all(set(parts) == {"shrink", "expand", "dS", "dB", "dA", "dX"} for parts in row["parts"].values())
    assert thin_gemms.main(["--tokens", "8", "--rounds", "1", "--base-share", "0.5"]) == 0
    out = capsys.readouterr().out
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ") and "ms" not in line
            and "---" not in line] == ["| q/k/v", "| o", "| gate/up", "| down"]
    assert out.count("would cost") == 2 and "adapter products with torch.mm" in out and "with thin.mm" in out
    assert "The base GEMMs themselves through thin.mm" in out


def test_table_shows_mfu_on_a_gpu():
    rows = [dict(provider=n, step_s=t, min_step_s=t, tokens_per_s=1024 / t, ratio_to_floor=t / 0.1,
                 speedup_vs_peft=0.12 / t, mfu=m) for n, t, m in (("floor", 0.1, 0.41), ("peft", 0.12, 0.342),
                                                                   ("ours", 0.105, 0.39))]
    config = dict(preset="llama-1b", layers=None, batch=4, seq=256, r=16, dropout=0.0, dtype="bf16", steps=10)
    text = bench_train.table(dict(device="NVIDIA H100 80GB HBM3", config=config, results=rows))
    lines = text.splitlines()
    assert "÷ 989 TFLOP/s" in lines[0] and lines[2].endswith("| MFU |") and lines[3].count("---") == 11
    assert lines[-1].startswith("| ours |") and lines[-1].endswith("| 39.0% |")
    cpu = bench_train.table(dict(device="cpu", config=dict(config, dtype="fp32"),
                                 results=[{k: v for k, v in r.items() if k != "mfu"} for r in rows]))
    assert "MFU" not in cpu


def test_header_gives_the_flop_shares_of_the_llama_preset():
    """cpu-llama-6x1024: the head's share of the floor's FLOPs is Llama-3-8B's (about 7%)."""
    args = bench_train.parse_args(["--layers", "1", "--seq", "16", "--batch", "1"])
    assert args.preset == "cpu-llama-6x1024"
    base = bench_train.build_base(args)
    shares = bench_train.flop_shares(base, bench_train.parse_args(["--seq", "256"]))
    T = 4 * 256
    layer = 1024 * 1024 * 2 + 2 * 1024 * 256 + 3 * 1024 * 2816               # q, o; k, v; gate, up, down
    head = 1024 * 5120
    adapter = 6 * 16 * (2 * 2048 + 2 * 1280 + 3 * (1024 + 2816)) * T          # 6 r (in + out) T per projection
    floor = lambda L: 4 * (L * layer + head) * T + 3 * 2 * 2 * T * 128 * 1024 * L      # GEMMs + causal attention
    assert shares["floor_flops"] == floor(1) and shares["adapter_flops"] == adapter     # this base: one layer
    assert shares["head_share"] == 4 * head * T / floor(1)
    assert abs(4 * head * T / floor(6) - 0.070) < 0.002                      # the preset's six layers: 7%
    six = bench_train.parse_args([])
    full = dict(bench_train.PRESETS[six.preset])
    lines = bench_train.table(dict(device="cpu", config=dict(preset=six.preset, layers=None, batch=4, seq=256, r=16,
                                                             dropout=0.0, dtype="fp32", steps=1),
                                   model=full, flops=dict(shares, floor_gflops_per_s=100.0), results=[])).splitlines()
    assert lines[1].startswith("model: 6 layers × 1024") and "output head" in lines[1] and "100 GFLOP/s" in lines[1]


def test_pool_train_pools_the_rounds_of_runs_with_the_same_settings(tmp_path, capsys):
    """bench/pool_train.py: per-round ratios of two runs put together (a provider missing from one run
    pools only the other's rounds); runs with other settings are refused."""
    import pool_train
    config = dict(preset="cpu-llama-6x1024", dropout=0.0, steps=3, providers="x", out="x")
    run = lambda steps, **kw: dict(config=dict(config, **kw), results=[dict(provider=n, steps=s) for n, s in steps.items()])
    one = run({"floor": [1.0, 2.0, 1.0], "ours": [1.1, 2.1, 1.05], "peft": [1.2, 2.4, 1.1]}, out="a.json")
    two = run({"floor": [1.0, 1.0, 1.0], "ours": [1.02, 1.03, 1.04]}, out="b.json", providers="floor,ours")
    files = []
    for name, r in (("a", one), ("b", two)):
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(r))
    pooled = pool_train.pooled_ratios([one, two])
    assert sorted(pooled["ours", "floor"]) == sorted([1.1, 1.05, 1.05, 1.02, 1.03, 1.04])
    assert len(pooled["peft", "ours"]) == 3 and len(pooled["peft", "floor"]) == 3
    assert pool_train.main([str(f) for f in files]) == 0
    out = capsys.readouterr().out
    assert "ours ÷ floor: 1.045 (1.025–1.075) over 6 rounds" in out and "peft ÷ ours: 1.091 (" in out
    other = tmp_path / "c.json"
    other.write_text(json.dumps(run({"floor": [1.0], "ours": [1.1]}, dropout=0.05)))
    with pytest.raises(SystemExit) as e:
        pool_train.main([str(files[0]), str(other)])
    assert e.value.code == 2
