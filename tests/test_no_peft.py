"""The package never imports peft (nor habana_frameworks) at run time."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in ('peft', 'habana_frameworks'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import pkgutil, importlib, lora
for m in pkgutil.walk_packages(lora.__path__, 'lora.'):
    importlib.import_module(m.name)
import runpy
for script in ('train.py', 'merge.py', 'infer.py'):
    if __import__('os').path.exists(script):
        sys.argv = [script, '--help']
        try:
            runpy.run_path(script, run_name='__main__')
        except SystemExit as e:
            assert e.code in (0, None), (script, e.code)
print('imported', sorted(k for k in sys.modules if k.startswith('lora')))
assert not any(k.split('.')[0] in ('peft', 'habana_frameworks') for k in sys.modules)
"""


def test_everything_imports_with_peft_blocked():
    r = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "lora.core.layer" in r.stdout and "lora.storage.adapter" in r.stdout


def test_no_package_attribute_hides_a_module():
    """`import lora.X as m` must give the module X: no name exported by lora/__init__.py may be
    spelled like one of its modules (merge_checkpoint the function once hid merge_checkpoint.py)."""
    import importlib
    import pkgutil

    import lora
    for m in pkgutil.walk_packages(lora.__path__, "lora."):
        module = importlib.import_module(m.name)
        parent, _, child = m.name.rpartition(".")
        assert getattr(importlib.import_module(parent), child) is module, m.name
