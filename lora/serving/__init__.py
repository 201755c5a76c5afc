"""Many adapters on one base, each row of a batch choosing its own (multi-adapter serving).

    layer.py    MultiLoRALinear: a frozen base Linear plus the stacked adapters of one module
    rows.py     the per-row adapter index of a forward (`adapter_rows`), grouped once per forward
    grouped.py  the plain grouped shrink/expand: one shrink and one expand per adapter in the batch
    load.py     `load_adapters(model, {name: dir})`: every adapter checked against the base, then stacked

    model = load_adapters(model, {"sql": "runs/sql", "chat": "runs/chat"})
    with adapter_rows(model, ["sql", None, "chat"]):     # row 1 is the base alone
        logits = model(input_ids).logits
"""
from .layer import MultiLoRALinear
from .load import adapter_names, load_adapters
from .rows import adapter_rows, row_index

__all__ = ["MultiLoRALinear", "load_adapters", "adapter_names", "adapter_rows", "row_index"]
