"""``cai``'s argument parser: a bad command line is one line on stderr and exit 2, with the closest option named."""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import NoReturn, Sequence


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
