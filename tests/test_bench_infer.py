"""bench/bench_infer.py: a small run end to end (the table and the weight-streaming ceiling under it)."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import bench_infer  # noqa: E402


def test_small_run_writes_the_table_and_the_streaming_ceiling(tmp_path, capsys):
    out = tmp_path / "infer"
    assert bench_infer.main(["--layers", "1", "--hidden", "128", "--vocab", "97", "--r", "4", "--batch", "1",
                             "--serve-batch", "4", "--adapters", "1", "4", "--no-peft", "--prompt-tokens", "5",
                             "--new-tokens", "3", "--rounds", "1", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["part"], r["provider"]): r for r in res["rows"]}
    assert rows[("mixed batch", "ours-1")]["same_tokens"] is True
    # One adapter: r · (in + out) fp32 elements over the 7 projections of the layer (hidden 128, MLP 352,
    # 2 heads of 64 and 1 KV head: k and v are 64 wide).
    one = 4 * 4 * ((128 + 128) * 2 + (128 + 64) * 2 + (128 + 352) * 3)
    streaming = res["streaming"]
    assert streaming["adapter_bytes"] == one
    one_ms = rows[("mixed batch", "one-adapter")]["decode_ms_per_step"]
    want = one_ms / (one_ms + 1000 * 3 * one / streaming["read_bandwidth"])
    assert abs(streaming["ceiling"]["4"] - want) < 1e-12 and streaming["ceiling"]["1"] == 1.0
    assert "Weight streaming:" in capsys.readouterr().out
