"""Errors that stop a run because of what the user gave it, not because of a bug.

Scripts print these as one clear message (no traceback) and exit with status 2; everything
already written (checkpoints, outputs) is left in place.
"""

from __future__ import annotations

import functools
import sys


class InputError(ValueError):
    """Bad or missing input: the message says what is wrong and what to do."""


class SaveError(InputError):
    """Writing a checkpoint, model or samples failed (usually a full disk or an exceeded quota).

    The message says what was being written, where, how much it needed and how much is free; the
    unfinished files were removed and what was saved before is intact. A subclass of InputError, so
    the scripts' error path prints it without a traceback and exits with status 2."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the weights were not updated with it."""


def exit_cleanly_on_input_errors(main):
    """Decorator for a script's entry point: InputError (SaveError too) / NonFiniteLossError -> message, exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (InputError, NonFiniteLossError) as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
