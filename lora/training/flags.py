"""train.py's command line, generated from `TrainConfig` and `LoRAConfig`: one flag per field.

    build_parser(description, preset)    the parser: a flag per TrainConfig field (its metadata gives
                                         the help and the --help section), one per LoRA field below, and
                                         lora.cli.add_device_flags for --device/--hpu-mode/--hpu-graphs/--dtype
    config_from_args(args, preset)       the TrainConfig: the fields' defaults, then `preset`, then the
                                         flags given on the command line

A flag is the field's name with dashes (`max_seq_len` -> `--max-seq-len`). Its value is read by the
field's type: int, float, text, `B1,B2` for a pair; a bool is a switch (`--pack`; `--progress` /
`--no-progress` where it defaults to on). Flags not given keep no value in the parsed namespace, so
a preset (the demo's) fills only what the command line leaves open.

No flag may start like one of torchrun's own options: torchrun's parser takes such a flag after the
script's name for an abbreviation of its own option and stops (tests/test_train.py passes every flag
through it).
"""
from __future__ import annotations

import argparse
import json
import typing
from dataclasses import MISSING, Field, dataclass, fields
from typing import Any, Callable

from ..cli import OneLineParser, add_device_flags
from ..core.config import INIT_MODES, LoRAConfig
from ..errors import LoRAError
from .config import DEVICE, GROUPS, LORA, TrainConfig, flag


# -- how a flag's text becomes a value --------------------------------------------------------
def names(text: str) -> list[str]:
    """`q_proj, v_proj` -> ["q_proj", "v_proj"]"""
    return [t.strip() for t in text.split(",") if t.strip()]


def ints(text: str) -> list[int]:
    try:
        return [int(t) for t in names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from None


def float_pair(text: str) -> tuple[float, float]:
    try:
        pair = tuple(float(t) for t in names(text))
    except ValueError:
        pair = ()
    if len(pair) != 2:
        raise argparse.ArgumentTypeError(f"two comma-separated numbers expected, got {text!r}")
    return pair


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("a JSON object {pattern: value} expected")
    return value


def targets(text: str) -> list[str] | str:
    return "all-linear" if text.strip() == "all-linear" else names(text)


INIT_WEIGHTS = {str(mode).lower(): mode for mode in INIT_MODES}      # "true", "false", "gaussian"


def init_weights(text: str) -> bool | str:
    if text not in INIT_WEIGHTS:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(INIT_WEIGHTS)}, got {text!r}")
    return INIT_WEIGHTS[text]


METAVARS = {names: "NAME,…", targets: "NAME,…", ints: "I,…", float_pair: "B1,B2", json_object: "JSON",
            init_weights: "{" + ",".join(INIT_WEIGHTS) + "}"}


# -- the flags --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    dest: str                           # the field's name
    options: tuple[str, ...]            # option strings, the canonical one first
    default: Any
    help: str
    group: str
    parse: Callable[[str], Any] | None  # None: a switch (a bool field)
    shown: str | None = None            # how the default reads (TrainConfig's `shown`)


# The LoRAConfig fields train.py sets, with their help and how their text is read; the defaults are
# LoRAConfig's. `r` is --lora-r, like its siblings: torchrun's parser takes a bare --r for an
# abbreviation of its own --rdzv-*/--role/--run-path (--r stays as an alias outside torchrun).
LORA_FLAGS = {
    "r": dict(help="adapter rank; --r is short for it outside torchrun", parse=int, options=("--lora-r", "--r")),
    "lora_alpha": dict(help="scaling = alpha / r", parse=float),
    "lora_dropout": dict(help="dropout on the adapter input", parse=float),
    "target_modules": dict(help="comma-separated module names (suffix match), or all-linear", parse=targets),
    "use_rslora": dict(help="scaling = alpha / sqrt(r)", parse=None),
    "use_dora": dict(help="DoRA: a trainable magnitude per output feature, W' = m * (W + s B A) / row norm "
                         "(PEFT's use_dora; docs/dora.md)", parse=None),
    "layers_to_transform": dict(help="comma-separated layer indices to adapt", parse=ints, shown="all"),
    "exclude_modules": dict(help="comma-separated module names (suffix match) never adapted", parse=names),
    "rank_pattern": dict(help='per-module r as JSON, e.g. \'{"down_proj": 16}\'', parse=json_object),
    "alpha_pattern": dict(help='per-module alpha as JSON, e.g. \'{"down_proj": 32}\'', parse=json_object),
    "init_lora_weights": dict(help="true: kaiming A, zero B (PEFT's default); gaussian: A ~ N(0, 1/r), zero B; "
                                   "false: both random (the adapter is not a no-op at step 0)", parse=init_weights),
}


def _default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _parse_of(hint) -> Callable[[str], Any] | None:
    """How a TrainConfig field's text is read, from its type (`int | None` is read as int)."""
    if typing.get_origin(hint) is tuple:
        return float_pair
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = args[0] if len(args) == 1 else hint
    if hint is bool:
        return None
    if hint in (int, float, str):
        return hint
    raise TypeError(f"TrainConfig: no flag reads {hint}")


def train_flags() -> list[Flag]:
    """Every flag train.py generates (the device flags come from lora.cli.add_device_flags)."""
    hints = typing.get_type_hints(TrainConfig)
    out = [Flag(f.name, (flag(f.name),), _default(f), f.metadata["help"], f.metadata["group"],
                _parse_of(hints[f.name]), f.metadata["shown"])
           for f in fields(TrainConfig) if f.metadata["group"] not in (DEVICE, LORA)]
    lora_fields = {f.name: f for f in fields(LoRAConfig)}
    for name, spec in LORA_FLAGS.items():
        out.append(Flag(name, spec.get("options", (flag(name),)), _default(lora_fields[name]), spec["help"], LORA,
                        spec["parse"], spec.get("shown")))
    return out


def _text(value: Any, switch: bool) -> str:
    """A value as its flag reads: a switch is on/off, a bool given as text true/false."""
    if isinstance(value, bool):
        return ("on" if value else "off") if switch else str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v, switch) for v in value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def help_line(f: Flag, preset: dict) -> str:
    """The flag's help with its default, and the preset's value where it differs."""
    switch = f.parse is None
    shown = f.shown if f.shown is not None else "none" if f.default in (None, {}) else _text(f.default, switch)
    other = (f"; demo {_text(preset[f.dest], switch)}" if f.dest in preset and preset[f.dest] != f.default
             else "")
    return f"{f.help} (default {shown}{other})".replace("%", "%%")


def build_parser(description: str, preset: dict) -> OneLineParser:
    """train.py's parser; `preset`: the demo's settings, shown in --help where they differ."""
    flags = train_flags()
    unknown = set(preset) - {f.dest for f in flags}
    if unknown:
        raise ValueError(f"preset: unknown setting(s) {', '.join(sorted(unknown))}")
    p = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for title in GROUPS:
        if title == DEVICE:
            dtype = next(f for f in fields(TrainConfig) if f.name == "dtype")
            add_device_flags(p, dtype_help=f"{dtype.metadata['help']} (default {dtype.default})",
                             dtypes=("fp32", "bf16"))
            continue
        group = p.add_argument_group(title)
        for f in (f for f in flags if f.group == title):
            kw = dict(dest=f.dest, default=argparse.SUPPRESS, help=help_line(f, preset))
            if f.parse is None:
                group.add_argument(*f.options, action=argparse.BooleanOptionalAction if f.default else "store_true",
                                   **kw)
            else:
                group.add_argument(*f.options, type=f.parse, metavar=METAVARS.get(f.parse), **kw)
    return p


def config_from_args(args: argparse.Namespace, preset: dict) -> tuple[TrainConfig, bool]:
    """(TrainConfig, demo?): the demo when neither --model nor --data is given, with `preset` applied
    under the flags given."""
    given = vars(args)
    demo = "model" not in given and "data" not in given
    if not demo and ("model" not in given or "data" not in given):
        raise LoRAError("--model and --data go together (give neither to run the demo)")
    if demo and ("eval_data" in given or "eval_split" in given):
        raise LoRAError("the demo evaluates on its own held-out examples: --eval-data and --eval-split need "
                        "--model and --data")
    values = {**(preset if demo else {}), **given}
    lora = LoRAConfig(**{k: v for k, v in values.items() if k in LORA_FLAGS})
    settings = {k: v for k, v in values.items() if k not in LORA_FLAGS}
    return TrainConfig(**{"model": "", "data": "", **settings}, lora=lora), demo
