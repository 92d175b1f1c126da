"""The ``cai`` command. Each command group lives in ``cosmicai.cli.<group>`` and exposes
``register(subparsers)``; heavy imports (torch, dask, boto3) happen inside the command functions so
``cai --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .. import __version__
from ..errors import CaiError
from .parser import CaiArgumentParser

#: Third-party modules outside the worker install, and the extra that brings each.
FULL_INSTALL_MODULES = {name: "full" for name in ("torch", "onnx", "galsim", "astropy", "scipy", "h5py", "matplotlib",
                                                    "yaml", "dask", "distributed", "dask_jobqueue")}
FULL_INSTALL_MODULES.update({name: "worker" for name in ("s3fs", "boto3", "botocore", "aiobotocore")})

# Command modules, in the order they appear in `cai --help`. A module missing here is simply skipped.
COMMAND_MODULES = ("data", "model", "run", "report", "aws", "cluster", "analysis", "simulate")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every available command group."""
    parser = CaiArgumentParser(prog="cai", description="Cloud-based Astronomy Inference: "
                               "plan -> infer -> summarize over local, Dask or AWS backends.")
    parser.add_argument("--version", action="version", version=f"cosmicai {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CaiArgumentParser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"cosmicai.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"cosmicai.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv`` and run the chosen command; bad input exits 2 with a one-line reason.

    SIGTERM (``kill PID``, a driver's ``Popen.terminate()``) takes the Ctrl-C path: the workers are stopped,
    completed work is kept, and the exit status is 143 (130 for Ctrl-C).
    """
    from ..backends.lifetime import Terminated, sigterm_as_interrupt

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
