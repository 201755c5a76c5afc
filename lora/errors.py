"""One exception type for every user-facing mistake.

Command lines catch `LoRAError` and print its message as a single line (no traceback): the message
must name the problem and, where it helps, the fix.
"""


class LoRAError(ValueError):
    """Bad input: a config, a file, a shape or a flag the user can fix."""
