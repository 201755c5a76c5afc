import os

from habana_frameworks import record

record("import habana_frameworks.torch", PT_HPU_LAZY_MODE=os.environ.get("PT_HPU_LAZY_MODE"))

from . import core, hpu  # noqa: E402,F401  (the real package exposes both as attributes)
