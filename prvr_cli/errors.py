"""Errors a user can act on, each with its documented exit code.

Anything raised as a `PrvrError` is printed as one line on stderr and the
process exits with `exit_code`; anything else is a bug and exits 1.
"""
from __future__ import annotations


class ExitCode:
    OK = 0
    INTERNAL = 1          # a bug: please report it with the traceback (PRVR_DEBUG=1)
    USAGE = 2             # bad flag or argument value
    PARTIAL = 3           # ingest finished, but some input files failed
    NO_INDEX = 4          # index missing or empty
    MISMATCH = 5          # index built with another encoder/model than the one asked for
    LOCKED = 6            # another prvr process is writing this index
    CORRUPT = 7           # index or checkpoint unreadable, or from a newer format version
    WEIGHTS = 8           # CLIP weights cannot be loaded (not cached, no network)
    DATA = 9              # bad training data: missing files, captions without features, wrong dims
    DISK = 10             # out of disk space or write error
    REMOTE = 11           # an index on object storage cannot be reached or refuses access
    INTERRUPTED = 130     # Ctrl-C


class PrvrError(Exception):
    """An error with a one-line message for the user and an exit code (a subclass names its code)."""

    exit_code = ExitCode.INTERNAL

    def __init_subclass__(cls, exit_code: int = ExitCode.INTERNAL, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.exit_code = exit_code

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(PrvrError, exit_code=ExitCode.USAGE):
    """A bad flag, argument or config value."""


class IndexMissingError(PrvrError, exit_code=ExitCode.NO_INDEX):
    """No index at that place, or an empty one."""


class MismatchError(PrvrError, exit_code=ExitCode.MISMATCH):
    """The index was built with another encoder or model than the one asked for."""


class LockedError(PrvrError, exit_code=ExitCode.LOCKED):
    """Another prvr process is writing the index."""


class CorruptError(PrvrError, exit_code=ExitCode.CORRUPT):
    """An index or checkpoint is unreadable, or was written by a newer prvr."""


class WeightsError(PrvrError, exit_code=ExitCode.WEIGHTS):
    """CLIP weights cannot be loaded (not cached, no network)."""


class DataError(PrvrError, exit_code=ExitCode.DATA):
    """Bad training data: a missing file, captions without features, mismatched dims."""


class DiskError(PrvrError, exit_code=ExitCode.DISK):
    """Out of disk space, or a write failed."""


class DecodeError(PrvrError, exit_code=ExitCode.PARTIAL):
    """One input video could not be decoded; ingest reports it and moves on."""


def random_weights_warning(clip_model: str) -> str:
    return f"CLIP model {clip_model} has random weights (--clip-pretrained none, seed 0): results are meaningless " \
        "outside tests"


class RemoteError(PrvrError, exit_code=ExitCode.REMOTE):
    """An index on object storage (s3://) cannot be reached, or refuses access."""
