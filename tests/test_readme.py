"""README's API example (docs/example_api.py is that code block) runs and prints what README shows."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_is_the_file_and_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = (ROOT / "docs" / "example_api.py").read_text()
    assert "```python\n" + code + "```" in readme
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "example_api.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "trainable params: 287,744 || all params: 3,570,944 || trainable%: 8.0579" in out
    for claim in ("bit for bit: True", "reloaded adapter, same logits: True", "adapter disabled = base: True"):
        assert claim in out
    assert float(re.search(r"merged, max \|logit diff\|: (\S+)", out).group(1)) < 1e-5
    assert (tmp_path / "runs" / "example-adapter" / "adapter_model.safetensors").is_file()
