"""`mpokit` command line: parse arguments, build a config, call the library."""
from __future__ import annotations

import argparse
import sys

from mpokit.cli import compress, evaluate, finetune, inspect
from mpokit.cli.common import fail
from mpokit.version import __version__

COMMANDS = {"compress": compress, "eval": evaluate, "inspect": inspect, "finetune": finetune}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpokit", description="Compress and adapt transformers with MPOs.")
    parser.add_argument("--version", action="version", version=f"mpokit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, ImportError, KeyError, TypeError) as e:
        fail(str(e) if not isinstance(e, KeyError) else f"unknown key {e}")
    except KeyboardInterrupt:
        fail("interrupted", 130)
    return 1


if __name__ == "__main__":
    sys.exit(main())
