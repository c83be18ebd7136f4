"""The command line."""
from .commands_tmp import app, main, run  # noqa: F401
