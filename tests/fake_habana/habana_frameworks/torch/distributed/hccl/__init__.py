"""Importing this registers the `hccl` process-group backend (real package); the fake records it."""
from habana_frameworks import record

record("import hccl")
