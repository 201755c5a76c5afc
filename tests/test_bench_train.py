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
           "--rounds", "1", "--top", "200", "--dropout", "0.1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split(" | ") for line in r.stdout.splitlines() if line.startswith("| aten::")]
    ops = {row[0][2:]: row for row in rows}
    assert float(ops["aten::addmm_"][1]) == 0 < float(ops["aten::addmm_"][2])    # only ours accumulates
    assert "floor: " in r.stdout and "ours: " in r.stdout and "minor page faults per step" in r.stdout
