"""The error type for faults in what the user gave us (files, keys, values).

Tools print a `UserError` as one line and exit non-zero; any other exception is a bug and keeps
its traceback.
"""

import sys
from typing import Callable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input, stated in one sentence naming the file, key or value."""


def exit_on_user_error(fn: Callable[..., T], *args, **kwargs) -> T:
    """Call `fn`; on a `UserError` print it as `error: ...` to stderr and exit with status 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
