"""What every stage entry point shares: argument parsing conventions and error reporting.

A :class:`~dsink.errors.DsinkError` becomes one line on stderr and exit code 2 (no traceback unless
``--debug`` or ``DSINK_DEBUG=1``); SIGINT/SIGTERM stop with a message and exit 130/143. Outputs are
written atomically by :mod:`dsink.artifacts`, so a failed or stopped stage leaves none behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence


class Interrupted(Exception):
    """Raised from a signal handler so ``finally`` blocks (temp-file cleanup) still run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml", help="params file to read (default: %(default)s)")
    p.add_argument(
        "--debug", action="store_true", help="show the full traceback on errors (or DSINK_DEBUG=1)"
    )
    return p


# The pipeline files stages read, by flag: (default path, help). One entry per file, so every stage that
# reads it offers the same flag with the same default.
INPUTS: dict[str, tuple[str, str]] = {
    "corrupted": ("data/corrupted/train.parquet", "corrupted index"),
    "val": ("data/corrupted/val.parquet", "validation split"),
    "imbalance-logits": ("data/logits/imbalance.parquet", "f_L logits"),
    "noise-logits": ("data/logits/noise.parquet", "f_N logits"),
    "student-logits": ("data/student/logits.parquet", "student logits"),
}


def add_inputs(p: argparse.ArgumentParser, *flags: str, helps: dict[str, str] | None = None) -> None:
    """Add ``--<flag>`` for each of ``flags`` (keys of :data:`INPUTS`), in that order, with its default
    path; ``helps`` replaces the help text of some of them."""
    for flag in flags:
        default, text = INPUTS[flag]
        p.add_argument(f"--{flag}", default=default, help=(helps or {}).get(flag, text))


def run(
    main: Callable[[argparse.Namespace], None], p: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> None:
    """Parse ``argv``, run ``main`` and turn user errors and signals into a clean exit."""
    from dsink.errors import DsinkError

    args = p.parse_args(argv)
    debug = args.debug or os.environ.get("DSINK_DEBUG", "") not in ("", "0")
    signal.signal(signal.SIGTERM, _raise_interrupted)
    signal.signal(signal.SIGINT, _raise_interrupted)
    name = p.prog
    try:
        main(args)
    except DsinkError as exc:
        if debug:
            traceback.print_exc()
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as exc:
        print(
            f"{name}: stopped by {exc}; no output was written. Rerun to continue from the last checkpoint.",
            file=sys.stderr,
        )
        sys.exit(128 + exc.signum)
