"""bench/gpu_session.sh, the GPU checks in one run: it cannot run without a GPU, so check what can
be: shell syntax, the time budget, and that every bench command's flags parse."""
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_session.sh"
sys.path.insert(0, str(ROOT / "bench"))
import bench_kernels  # noqa: E402
import bench_train  # noqa: E402


def steps():
    text = SCRIPT.read_text().replace("\\\n", " ")
    return [line.split(None, 2)[1:] for line in text.splitlines() if line.startswith("step ")]


def test_syntax_and_budget():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    limits = [int(limit) for limit, _ in steps()]
    assert len(limits) == 8 and sum(limits) <= 540        # 540 s in all


def test_bench_flags_parse(tmp_path):
    seen = set()
    for _, command in steps():
        argv = shlex.split(command.replace('"$RESULTS"', str(tmp_path)).replace('"$PY"', "python3"))
        for name, module in (("bench/bench_train.py", bench_train), ("bench/bench_kernels.py", bench_kernels)):
            if name in argv:
                module.parse_args(argv[argv.index(name) + 1:])   # exits (SystemExit) on an unknown flag
                seen.add(name)
    assert seen == {"bench/bench_train.py", "bench/bench_kernels.py"}
    assert re.search(r"--out \"\$RESULTS/train-gpu\.json\"", SCRIPT.read_text())
