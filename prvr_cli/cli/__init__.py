"""The `prvr` command line: one module per command group, each command flags -> one library call -> output.

`app` holds the commands, `main` maps errors to exit codes, `output` prints results (stdout) and progress (stderr).
"""
from .main import main, run  # noqa: F401
