"""The ``aperturedb-pool`` command line.

Each subcommand lives in its own module and is imported only when it runs, so
``aperturedb-pool --help`` stays fast and never imports the SDK.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from aperturedb_pool._version import __version__

__all__ = ["main", "SUBCOMMANDS"]

# subcommand -> (module with a ``main(argv) -> int``, one-line help)
SUBCOMMANDS = {
    "serve": ("aperturedb_pool.testing.cli",
              "run the embedded ApertureDB-protocol server until SIGINT/SIGTERM"),
    "bench": ("aperturedb_pool.bench",
              "load-test a server through the pool (an embedded server when none is configured)"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aperturedb-pool",
        description="Connection pool for the ApertureDB Python SDK: tools.",
        epilog="Run 'aperturedb-pool COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not args or args[0] not in SUBCOMMANDS:
        # --help, --version, or a bad command: argparse prints and exits.
        parser.parse_args(args)
        parser.print_help()
        return 2
    module_name, _ = SUBCOMMANDS[args[0]]
    module = importlib.import_module(module_name)
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
