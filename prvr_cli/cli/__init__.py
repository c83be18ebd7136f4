"""The `prvr` command line: one module per command group, each command flags -> one library call -> output.

`app` holds the commands, `entry` maps errors to exit codes, `output` prints results (stdout) and progress (stderr).
`run` first lets a running `prvr serve` answer a plain `prvr search` (`served`), before importing the rest.
"""
import os
import sys


def run() -> None:
    # numpy's BLAS on one thread unless told otherwise: a query's products are small, and spare BLAS threads
    # spinning beside other busy processes made a text encoding 10-50x slower (docs/benchmarks.md). Torch keeps
    # its own thread pool for ingest and training.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from .served import served_main

    code = served_main(sys.argv[1:])
    if code is None:
        from .entry import main as full_main

        code = full_main()
    sys.exit(code)


def main(argv=None) -> int:
    """Run the command line on `argv` in this process (the full path); returns the exit code."""
    from .entry import main as full_main

    return full_main(argv)
