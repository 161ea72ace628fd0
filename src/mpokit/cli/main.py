"""`mpokit` command line: parse arguments, build a config, call the library.

Errors: a user error (bad flag, missing or unreadable file, invalid input; the explicit list
USER_ERRORS) prints one line `mpokit: error: ...` and exits with code 2. Any other exception
is an internal error: one line saying so and where its full traceback was written, exit code 1.
`mpokit --debug ...` (or MPOKIT_DEBUG=1) lets every exception through with its traceback.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

from mpokit.cli import compress, data, embed, evaluate, export, finetune, inspect, report
from mpokit.cli.common import UserError, fail
from mpokit.version import __version__

COMMANDS = {"compress": compress, "eval": evaluate, "inspect": inspect, "finetune": finetune, "export": export,
            "report": report, "embed": embed, "data": data}

# Exceptions that describe a mistake in the input, not a bug. ValueError is the library's
# validation error ("expected X, got Y"; CheckpointError, OutputPathError derive from it),
# OSError covers missing/unreadable files and folders (MissingModelError is a FileNotFoundError),
# re.error an invalid regular expression. ImportError counts only when a package is missing.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, OSError, re.error)


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: `mpokit: error: ...`, exit code 2."""

    def error(self, message: str):  # noqa: D401 (argparse API)
        fail(f"{_one_line(message)} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mpokit", description="Compress and adapt transformers with MPOs.")
    parser.add_argument("--version", action="version", version=f"mpokit {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of any error (also: MPOKIT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def is_user_error(e: BaseException) -> bool:
    if isinstance(e, USER_ERRORS):
        return True
    # a missing (optional) package: our messages say how to install it
    return isinstance(e, ModuleNotFoundError) or (isinstance(e, ImportError) and "pip install" in str(e))


def user_message(e: BaseException) -> str:
    if isinstance(e, re.error):
        return _one_line(f"invalid regular expression {e.pattern!r}: {e}")
    message = _one_line(str(e))
    return message or type(e).__name__


def log_dir() -> Path:
    """Where tracebacks of internal errors go: $MPOKIT_CACHE/logs (default ~/.cache/mpokit/logs)."""
    return Path(os.environ.get("MPOKIT_CACHE", Path.home() / ".cache" / "mpokit")) / "logs"


def write_error_log(e: BaseException, argv: list[str]) -> Path | None:
    """The traceback of `e` in a new file under log_dir() (else the temp folder); None if neither is writable."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    body = (f"mpokit {__version__}, python {sys.version.split()[0]}\n"
            f"argv: {argv!r}\n\n" + "".join(traceback.format_exception(type(e), e, e.__traceback__)))
    for folder in (log_dir(), Path(tempfile.gettempdir()) / "mpokit-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"error-{stamp}-{os.getpid()}.log"
            path.write_text(body, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("MPOKIT_DEBUG", "") not in ("", "0")
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        if debug:
            raise
        fail("interrupted", 130)
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001: classified below, never swallowed
        if debug:
            raise
        if is_user_error(e):
            fail(user_message(e))
        log = write_error_log(e, argv)
        where = f"full traceback in {log}" if log else "no log file could be written"
        first = _one_line(str(e).splitlines()[0] if str(e) else "")
        fail(f"internal error: {type(e).__name__}{': ' + first if first else ''} (a bug in mpokit; {where}; "
             f"rerun with `mpokit --debug ...` to see it, and please report it with that file)", 1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
