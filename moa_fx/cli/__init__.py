"""The ``moa-fx`` command line: one module per subcommand, rendering in :mod:`.render`.

- ``moa-fx dump MODEL``  — the captured graph, or after the rewrite (:mod:`.dump`)
- ``moa-fx sites MODEL --spec S`` — what each spec rule matches and the parameters it adds (:mod:`.sites`)
- ``moa-fx diff ...``  — graph before/after a spec, two specs, or two JSON dumps (:mod:`.diff`)
- ``moa-fx train``  — a training run, offline by default (:mod:`.train`; the run is :mod:`moa_fx.train`)

Every :class:`~moa_fx.errors.MoaFxError` becomes one line on stderr and exit status 2;
``MOA_FX_DEBUG=1`` re-raises it with the full traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from ..errors import MoaFxError
from . import diff, dump, sites, train
from .render import make_console

__all__ = ["main", "build_parser"]

COMMANDS = (dump, sites, diff, train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moa-fx", description="Rewrite a Hugging Face model's FX graph into a Mixture-of-Adapters model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Set MOA_FX_PLAIN=1 (or --plain) for fixed-width output without colour; "
               "MOA_FX_DEBUG=1 for full tracebacks.")
    parser.add_argument("--plain", action="store_true", help="no colour, width 120 (also: MOA_FX_PLAIN=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.NAME, help=cmd.HELP, description=cmd.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help and usage errors
        return int(exit_.code or 0)
    console = make_console(plain=args.plain)
    try:
        return int(args.run(args, console) or 0)
    except MoaFxError as err:
        if os.environ.get("MOA_FX_DEBUG"):
            raise
        message = " ".join(str(err).split())
        print(f"error: {message}\n(set MOA_FX_DEBUG=1 for the full traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
