from . import normalization, optimizers  # noqa: F401
