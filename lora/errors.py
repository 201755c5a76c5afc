"""The two exception types a command line turns into one `error:` line (no traceback).

`LoRAError`: bad input (a config, a file, a shape or a flag the user can fix); exit status 2.
`LoRAFailure`: valid input, and the work itself failed (training diverged, a merge did not verify);
exit status 1. Messages name the problem and, where it helps, the fix.
"""


class LoRAError(ValueError):
    """Bad input: a config, a file, a shape or a flag the user can fix."""


class LoRAFailure(RuntimeError):
    """The work failed on valid input; the message says what was kept."""
