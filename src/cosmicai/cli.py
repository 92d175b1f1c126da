"""The ``cai`` command. Each command group lives in ``cosmicai.commands.<group>`` and exposes
``register(subparsers)``; heavy imports (torch, dask, boto3) happen inside the command functions so
``cai --help`` stays fast.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from typing import Any, NoReturn, Sequence

from . import __version__
from .errors import CaiError

#: Third-party modules outside the worker install, and the extra that brings each.
FULL_INSTALL_MODULES = {name: "full" for name in ("torch", "onnx", "galsim", "astropy", "scipy", "h5py", "matplotlib",
                                                    "yaml", "dask", "distributed", "dask_jobqueue")}
FULL_INSTALL_MODULES.update({name: "worker" for name in ("s3fs", "boto3", "botocore", "aiobotocore")})

# Command modules, in the order they appear in `cai --help`. A module missing here is simply skipped.
COMMAND_MODULES = ("data", "model", "run", "report", "aws", "cluster", "analysis", "simulate")


class CaiArgumentParser(argparse.ArgumentParser):
    """``cai``'s parser (and every subcommand's): a bad command line is one line on stderr, exit 2; an unknown
    option is answered with the closest option of that very (sub)command."""

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        self._seen = list(sys.argv[1:] if args is None else args)
        namespace, extras = super().parse_known_args(args, namespace)
        options = self._unknown(extras)
        if options:  # caught here, by the innermost parser, which alone knows its options
            self.error(self.unknown_option_message(options))
        return namespace, extras

    def _unknown(self, strings: Sequence[str]) -> list[str]:
        """The strings that look like options this parser does not know (nor abbreviate)."""
        known = self.known_options()
        return [a for a in strings if a.startswith("-") and len(a) > 1 and not _is_number(a)
                and not any(k.startswith(a.split("=", 1)[0]) for k in known)]

    def known_options(self) -> list[str]:
        """Every option string this parser accepts (``--help`` included)."""
        return [s for action in self._actions for s in action.option_strings]

    def unknown_option_message(self, unknown: list[str]) -> str:
        """``unrecognized option --batchsize; did you mean --batch-size?`` (or the plain list when nothing is
        close)."""
        name = unknown[0].split("=", 1)[0]
        close = difflib.get_close_matches(name, self.known_options(), n=1, cutoff=0.6)
        if close:
            return f"unrecognized option {name}; did you mean {close[0]}?"
        return f"unrecognized arguments: {' '.join(unknown)}"

    def error(self, message: str) -> NoReturn:
        if message.startswith("the following arguments are required"):
            typos = self._unknown(getattr(self, "_seen", []))  # a misspelt required option: name the typo first
            if typos:
                message = self.unknown_option_message(typos)
        hint = "" if "did you mean" in message else f" (see `{self.prog} --help`)"
        self.exit(2, f"cai: error: {message}{hint}\n")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every available command group."""
    parser = CaiArgumentParser(prog="cai", description="Cloud-based Astronomy Inference: "
                               "plan -> infer -> summarize over local, Dask or AWS backends.")
    parser.add_argument("--version", action="version", version=f"cosmicai {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CaiArgumentParser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"cosmicai.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"cosmicai.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the chosen command; bad input exits 2 with a one-line reason.

    SIGTERM (``kill PID``, a driver's ``Popen.terminate()``) takes the Ctrl-C path: the workers are stopped,
    completed work is kept, and the exit status is 143 (130 for Ctrl-C).
    """
    from .backends.lifetime import Terminated, sigterm_as_interrupt

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with sigterm_as_interrupt():
            rc = args.func(args)
    except CaiError as exc:
        print(f"cai: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        extra = FULL_INSTALL_MODULES.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"cai: error: {args.command} needs {exc.name}, which this install does not have (the worker install "
              f"runs AstroMAE on ONNX Runtime only): pip install 'cosmicai[{extra}]'", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(f"cai: terminated (signal {exc.signum}); completed work is kept and a rerun resumes it",
              file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cai: interrupted; completed work is kept and a rerun resumes it", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
