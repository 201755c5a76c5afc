"""Find the target projections of a model and swap them for `LoRALinear`, in place.

Matching follows PEFT, so an adapter_config.json means the same module set here and there:
- a list: a module matches when its full name equals an entry or ends with "." + entry;
- a string: a regex that must match the full module name; "all-linear": every nn.Linear except
  the output head;
- layers_to_transform: only modules under ".<layers_pattern>.<i>." with i in the list.
"""
from __future__ import annotations

import contextlib
import re

import torch.nn as nn

from .config import LoRAConfig
from ..errors import LoRAError
from .group import SharedInputGroup
from .layer import LoRALinear
from ..quant.nf4 import NF4Weight

# Sibling projections that Llama/Mistral/Qwen2 call one after the other on the same input.
SHARED_INPUT_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def output_head_names(model: nn.Module) -> set[str]:
    heads = {"lm_head"}
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is not None:
        heads |= {name for name, m in model.named_modules() if m is head}
    return heads


def _layer_index(name: str, layers_pattern) -> int | None:
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
    else:
        pats = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = next((mm for p in pats if (mm := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name))), None)
    return int(m.group(1)) if m else None


def _matches(name: str, target, linear_heads: set[str]) -> bool:
    if target == "all-linear":
        return name not in linear_heads and name.split(".")[-1] not in linear_heads
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _excluded(name: str, exclude) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return any(name == t or name.endswith("." + t) for t in exclude)


def select_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the nn.Linear modules `config` adapts; a one-line error if a target matches nothing."""
    heads = output_head_names(model)
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)]
    candidates = sorted({n.split(".")[-1] for n in linears})
    targets = config.target_modules
    # Each listed name must match something (a typo should not silently train nothing).
    if isinstance(targets, list):
        for t in targets:
            hits = [n for n in modules if n and (n == t or n.endswith("." + t))]
            if not hits:
                raise LoRAError(f"target module {t!r} matches no module; candidates: {', '.join(candidates)}")
            if not any(isinstance(modules[n], nn.Linear) for n in hits):
                raise LoRAError(f"target module {t!r} matches {hits[0]} ({type(modules[hits[0]]).__name__}), "
                                f"which is not an nn.Linear; candidates: {', '.join(candidates)}")
    chosen = []
    for name in linears:
        if not _matches(name, targets, heads) or _excluded(name, config.exclude_modules):
            continue
        if config.layers_to_transform is not None:
            if _layer_index(name, config.layers_pattern) not in config.layers_to_transform:
                continue
        chosen.append(name)
    if not chosen:
        raise LoRAError(f"target_modules {targets!r} (layers {config.layers_to_transform}) match no "
                        f"nn.Linear; candidates: {', '.join(candidates)}")
    return chosen


def apply_lora(model: nn.Module, config: LoRAConfig, group_shared_inputs: bool = True) -> nn.Module:
    """Replace the matching nn.Linear modules by LoRALinear in place; freeze everything else.

    With `group_shared_inputs`, adapted q/k/v (and gate/up) siblings share one shrink of their common
    input on the plain PyTorch path (lora/core/group.py); results are the same up to float rounding.
    `config.use_dora` makes every layer a DoRA layer (trainable lora_magnitude_vector; lora/core/dora.py).
    """
    if lora_layers(model):
        raise LoRAError("model already has LoRA layers; apply_lora once per model")
    chosen = set(select_targets(model, config))

    def walk(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if name in chosen:
                setattr(module, child_name, LoRALinear(
                    child, r=config.rank_for(name), alpha=config.alpha_for(name),
                    dropout=config.lora_dropout, use_rslora=config.use_rslora,
                    init_lora_weights=config.init_lora_weights, use_dora=config.use_dora))
            else:
                walk(child, name + ".")

    walk(model, "")
    if group_shared_inputs:
        group_siblings(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith((".lora_A", ".lora_B", ".lora_magnitude_vector")))
    model.lora_config = config
    return model


def group_siblings(model: nn.Module) -> None:
    """Link adapted siblings that read the same input (q/k/v; gate/up) into a SharedInputGroup. DoRA
    layers run one op each (lora/core/dora.py) and join no group."""
    for parent in model.modules():
        for names in SHARED_INPUT_SIBLINGS:
            members = [m for n in names if isinstance(m := getattr(parent, n, None), LoRALinear) and not m.use_dora]
            if len(members) >= 2:
                group = SharedInputGroup(members)
                for m in members:
                    m.group = group


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear modules back."""
    def walk(module: nn.Module) -> None:
        for child_name, child in module.named_children():
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(module, child_name, child.to_linear())
            else:
                walk(child)
    walk(model)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Inside the block the model computes the plain base (every LoRALinear skips its update)."""
    layers = list(lora_layers(model).values())
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(layer.disable_adapter())
        yield model


def trainable_parameters(model: nn.Module) -> str:
    """PEFT's report: 'trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622'."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.numel() for m in model.modules() if isinstance(m, NF4Weight))   # 4-bit weights count whole
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
