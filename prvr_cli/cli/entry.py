"""From a command line to an exit code: run the app, turn every error into one line on stderr and a documented code.

The codes are `prvr_cli.errors.ExitCode` (the README's table). Results go to stdout only; when stdout
is closed early (`prvr search ... | head -1`), prvr exits quietly.
"""
from __future__ import annotations

import errno
import os
import sys

import typer

from ..errors import ExitCode, PrvrError
from .app import app
from .output import stderr
from .plain import StdoutClosed


# OS errors a user can act on (from writes outside the store's own guard, e.g. index.json or the cache)
_IO_ERRORS = {errno.ENOSPC: ("no space left on the device; free space and run again", ExitCode.DISK),
              errno.EDQUOT: ("disk quota exceeded; free space and run again", ExitCode.DISK),
              errno.EROFS: ("cannot write to a read-only file system", ExitCode.DISK),
              errno.EIO: ("input/output error", ExitCode.DISK),
              errno.EACCES: ("permission denied", ExitCode.USAGE),
              errno.EPERM: ("operation not permitted", ExitCode.USAGE)}

# typer < 0.26 raises click's exceptions; typer >= 0.26 vendors click and raises its own copies. Both are found
# from typer's public names, so usage errors exit 2 whichever typer is installed.
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

# What Ctrl-C leaves behind, per command (the first word of the command line).
_INTERRUPTED = {"ingest": "interrupted; finished videos are kept",
                "reindex": "interrupted; the index keeps its previous prototypes",
                "train": "interrupted; last.pt holds the last finished epoch, continue with --resume",
                "bench": "interrupted; finished runs are kept and reused by the next run"}


def _report(e: Exception) -> int:
    """One line on stderr for an exception the commands did not handle; returns the exit code."""
    if isinstance(e, OSError) and e.errno in _IO_ERRORS:
        where = f" ({e.filename})" if e.filename else ""
        stderr.print(f"prvr: error: {_IO_ERRORS[e.errno][0]}{where}", markup=False, soft_wrap=True)
        return _IO_ERRORS[e.errno][1]
    if _is_lance_error(e):  # the tables' files are damaged or unreadable
        if os.environ.get("PRVR_DEBUG"):
            raise e
        stderr.print("prvr: error: the index's tables are damaged or unreadable; restore the index folder from "
                     "a backup or re-ingest into a new one (PRVR_DEBUG=1 shows the storage engine's message)",
                     markup=False, soft_wrap=True)
        return ExitCode.CORRUPT
    if os.environ.get("PRVR_DEBUG"):
        raise e
    stderr.print(f"prvr: internal error: {type(e).__name__}: {e} (set PRVR_DEBUG=1 for the traceback and "
                 "report it)", markup=False, soft_wrap=True)
    return ExitCode.INTERNAL


def _is_lance_error(e: Exception) -> bool:
    text = str(e)
    return "LanceError" in text or "lance error" in text or type(e).__module__.split(".")[0] in ("lance", "lancedb")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turn known errors into one line and an exit code."""
    import warnings

    warnings.showwarning = lambda message, *args, **kwargs: stderr.print(f"prvr: warning: {message}", markup=False)
    args = sys.argv[1:] if argv is None else list(argv)
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="prvr", standalone_mode=False) or 0
    except PrvrError as e:
        if os.environ.get("PRVR_DEBUG") and e.__cause__ is not None:
            raise
        stderr.print(f"prvr: error: {e}", markup=False, highlight=False, soft_wrap=True)
        code = e.exit_code
    except typer.Exit as e:
        code = e.exit_code
    except CLICK_ERROR as e:  # usage errors: missing argument, unknown option or command, bad value
        e.show(file=sys.stderr)
        code = ExitCode.USAGE
    except (KeyboardInterrupt, typer.Abort):
        code = ExitCode.INTERRUPTED
    except (BrokenPipeError, StdoutClosed):
        code = 0
    except Exception as e:
        code = _report(e)
    if code == ExitCode.INTERRUPTED:  # typer turns Ctrl-C into a silent exit 130
        verb = next((a for a in args if not a.startswith("-")), "")
        stderr.print(f"prvr: {_INTERRUPTED.get(verb, 'interrupted')}", markup=False)
    _close_stdout()
    return code


def _close_stdout() -> None:
    """Flush stdout, then point it at /dev/null: it may be a closed pipe (`prvr search ... | head`), and the
    interpreter's own flush at exit must not complain."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass
    finally:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass

