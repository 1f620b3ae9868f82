"""The `flower` commands: one module per command, each owning its parser, its `main(argv, prog)` and what it
prints at the end. The libraries (training, ensemble, service) only raise; the exit status is chosen here.

Every command's `main` is wrapped by `command`, the one place that applies the exit status rules:
  0    done
  2    a `FlowerError` (a bad option, config value, file or folder: one line `error: <message>` on stderr), an
       argparse error, or an `OSError` naming what failed (a missing or unreadable file, a full disk)
  130  interrupted (Ctrl-C): one line `interrupted` on stderr (also while the command's module is still being
       imported: flower.cli applies the same rule there); whatever the command writes is written whole or not at
       all. Once the command has returned, the `flower` process ignores Ctrl-C while it exits (its work is written).
  143  terminated (SIGTERM), in a command that calls `stop_on_sigterm` (`flower train`, `flower predict`): after
       the same clean-ups as Ctrl-C
  1    anything else is a bug: it propagates with its traceback (Python's own exit status 1)
A command may return its own documented statuses besides these (`flower overlap`: 1 when pairs are found;
`flower predict`: 1 when some images failed; `flower serve`: 1 when the models cannot be served).
"""

from __future__ import annotations

import functools
import signal
import sys
from collections.abc import Callable

from core.errors import FlowerError

USAGE_ERROR = 2  # argparse's own status for a bad option: every user error exits with it
INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process ended by SIGTERM

Main = Callable[[list[str] | None, str], int]


def error(message: str) -> int:
    """Print `error: <message>` on stderr; returns the status of a user error."""
    print(f"error: {message}", file=sys.stderr)
    return USAGE_ERROR


def terminate(signum: int, frame: object) -> None:
    """The SIGTERM handler of `stop_on_sigterm`: leave as Ctrl-C does, through every clean-up, with status 143."""
    raise SystemExit(TERMINATED)


def stop_on_sigterm() -> None:
    """Make SIGTERM end this command through its clean-ups (a partial file removed) instead of at once."""
    signal.signal(signal.SIGTERM, terminate)


def interrupted() -> int:
    """Say `interrupted` on stderr; returns the status of Ctrl-C."""
    # A Ctrl-C that lands inside an exec() of a string (numpy's and scipy's imports run some) sets CPython's
    # "unhandled KeyboardInterrupt" flag even when it is caught, and the interpreter then ends by SIGINT instead
    # of this status (seen 4 times in 13 Ctrl-C's during `flower blend`'s imports). The next exec() of a string
    # clears that flag.
    exec("")
    print("interrupted", file=sys.stderr)
    return INTERRUPTED


def interrupted_import(err: ImportError) -> bool:
    """Whether an ImportError is a Ctrl-C in disguise: a compiled module (scipy's pybind11 ones) whose
    initialisation was interrupted says 'initialization failed', caused by the KeyboardInterrupt."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, KeyboardInterrupt):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


def os_error_text(err: OSError) -> str:
    """What an OSError says, with the file it names: '<file>: No space left on device'."""
    where = f"{err.filename}: " if err.filename else ""
    return f"{where}{err.strerror or err}"


def command(main: Main) -> Callable[..., int]:
    """Wrap a command's `main(argv, prog)` with the exit status rules of the module docstring."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None, prog: str = "flower") -> int:
        try:
            return int(main(argv, prog) or 0)
        except FlowerError as err:
            return error(str(err))
        except OSError as err:  # the world, not the code: a file missing or unreadable, a full or read-only disk
            return error(os_error_text(err))
        except KeyboardInterrupt:
            return interrupted()
        except ImportError as err:  # a library loaded inside main (TensorFlow when training)
            if interrupted_import(err):
                return interrupted()
            raise

    return run
