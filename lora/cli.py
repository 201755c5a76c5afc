"""What train.py, merge.py and infer.py share on the command line.

- `OneLineParser`: argparse's mistakes as one `error: …` line, exit status 2;
- `add_device_flags`: --device, --hpu-mode, --hpu-graphs and --dtype, defined once;
- `run_main`: runs a script's body with Ctrl-C and SIGTERM turned into exceptions
  (lora/runtime/signals.py), and what it raises into one line and an exit status: 2 for bad input
  (`LoRAError`), 1 for a failure (`LoRAFailure`, an OS error), 130 / 143 when interrupted by
  SIGINT / SIGTERM (`interrupted`, and what was kept).
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import LoRAError, LoRAFailure
from .runtime.signals import Interrupted, handle_signals

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class OneLineParser(argparse.ArgumentParser):
    """argparse's mistakes as one `error: …` line (no usage block), exit status 2 as argparse's."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def add_device_flags(parser: argparse.ArgumentParser, dtype_help: str, dtypes=None) -> None:
    """--device, --hpu-mode, --hpu-graphs and --dtype. `dtype_help` says what the script does with
    the dtype (and what `auto` means there); `dtypes` narrows the choices of lora.runtime.device.DTYPES."""
    from .runtime.device import DTYPES, HPU_MODES
    group = parser.add_argument_group("device")
    group.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "hpu"),
                       help="auto: Gaudi (HPU) when habana_frameworks sees one, else CUDA, else CPU (default auto)")
    group.add_argument("--hpu-mode", default="lazy", choices=HPU_MODES,
                       help="HPU execution mode, set as PT_HPU_LAZY_MODE before any habana import: lazy "
                            "(graphs flushed by mark_step, + HPU Graphs) or eager (+ torch.compile hpu_backend) "
                            "(default lazy)")
    group.add_argument("--hpu-graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="HPU Graphs (training: ModuleCacher; inference: wrap_in_hpu_graph); lazy mode only "
                            "(default: on in lazy mode)")
    group.add_argument("--dtype", default="auto", choices=("auto", *(dtypes or DTYPES)), help=dtype_help)


def set_hpu_mode_first(args: argparse.Namespace) -> None:
    """PT_HPU_LAZY_MODE from --hpu-mode, before anything (transformers included) can import
    habana_frameworks: the lazy/eager default changed between Gaudi releases."""
    if args.device in ("auto", "hpu"):
        from .runtime.device import set_hpu_mode
        set_hpu_mode(args.hpu_mode)


def run_main(body: Callable[[], None]) -> int:
    """Run a script's body; what it raises becomes one line on stderr and an exit status."""
    handle_signals()
    try:
        body()
    except LoRAError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except LoRAFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except Interrupted as e:
        print("interrupted" + (f": {e.kept}" if e.kept else ""), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK
