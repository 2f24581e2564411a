"""dualsearch: train CLIP-style dual encoders and search images with natural language.

examples:
  dualsearch demo                                            # the whole path on generated data
  dualsearch index ~/Pictures --model MODEL --out pics-index # embed a photo folder (incremental)
  dualsearch search pics-index "a dog on the beach" --grid grid.png
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from ..errors import DualsearchError
from ..logs import setup_logging
from . import data, index, library, search, train
from .common import CommandParser, HelpFormatter, safe_output

log = logging.getLogger("dualsearch")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: each command's parser lives beside its handler."""
    parser = argparse.ArgumentParser(prog="dualsearch", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks of internal errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for module in (data, train, index, search, library):
        module.register(sub)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; an option the command does not know is reported with that command's usage
    (argparse alone reports it with the top-level usage)."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        args.parser_.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 2 a :class:`DualsearchError` (printed as one line),
    or an ``OSError``, 130 interrupted, 1 an internal error (one line; its traceback with ``-v``)."""
    safe_output(sys.stdout, sys.stderr)
    args = parse(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        args.func(args)
    except DualsearchError as e:
        print(f"dualsearch: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dualsearch search ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # the file system said no (permissions, a full disk): not a bug
        print(f"dualsearch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # errors.Interrupted says what was kept
        print(f"dualsearch: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:
        if args.verbose:
            raise
        print(f"dualsearch: internal error: {type(e).__name__}: {e} (run with -v for the traceback; "
              f"this is a bug, please report it)", file=sys.stderr)
        return 1
    return 0
