"""The ``dormant`` command line. Each area registers its subcommands from its own module here; handlers map
flags 1:1 onto config dataclasses and call library verbs or the runs of :mod:`dormant.experiments`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from dormant.config import UserError

__all__ = ["main", "build_parser"]

# Modules with a ``register(subparsers)`` function, in the order their commands are listed.
COMMAND_MODULES = (
    "dormant.cli.llm",
    "dormant.cli.lm_eval",
    "dormant.cli.analysis",
    "dormant.cli.predictors",
    "dormant.cli.offload",
    "dormant.cli.snn",
    "dormant.cli.demo",
)


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (what is wrong, where to look) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dormant",
        description="Make neural networks do less work per inference by letting neurons stay silent.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too "
                                                             "(also DORMANT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (a :class:`~dormant.config.UserError`: a refused flag, a missing or corrupted
    file, an unsupported model) prints one line and returns 2; anything else is a bug and shows its traceback."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    debug = ns.debug or os.environ.get("DORMANT_DEBUG") == "1"
    try:
        return int(ns.handler(ns) or 0)
    except UserError as e:
        if debug:
            raise
        print(f"dormant {ns.command}: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished results are kept and a rerun resumes", file=sys.stderr)
        return 130


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
