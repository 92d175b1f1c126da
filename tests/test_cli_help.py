"""The command line: an unknown option gets one line with the closest option of that subcommand, and every
option of every command has help text."""

from __future__ import annotations

import argparse
from typing import Iterator

import pytest

from cosmicai.cli import build_parser, main


def _parsers(parser: argparse.ArgumentParser, name: str = "cai") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _parsers(child, f"{name} {sub}")


@pytest.mark.parametrize("argv, line", [
    (["run", "--batchsize", "8"], "cai: error: unrecognized option --batchsize; did you mean --batch-size?"),
    (["run", "--reslt=out"], "cai: error: unrecognized option --reslt; did you mean --result?"),
    (["report", "results", "--jsn"], "cai: error: unrecognized option --jsn; did you mean --json?"),
    (["stats", "root", "--batch-grup", "25MB/1GB"],
     "cai: error: unrecognized option --batch-grup; did you mean --batch-group?"),
    (["--versoin"], "cai: error: unrecognized option --versoin; did you mean --version?"),
    (["plot", "run", "--out", "x", "--zzz"], "cai: error: unrecognized arguments: --zzz (see `cai plot --help`)"),
])
def test_unknown_options_get_one_line_and_a_suggestion(argv, line, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and captured.out == ""


def test_nested_subcommands_suggest_their_own_options(capsys):
    parsers = dict(_parsers(build_parser()))
    nested = [name for name in parsers if name.count(" ") == 2]
    assert nested, "expected subcommands such as `cai data synth`"
    name = nested[0]
    option = next(s for a in parsers[name]._actions for s in a.option_strings if s.startswith("--") and len(s) > 6
                  and s != "--help")
    typo = option[:-2] + option[-1] + option[-2]  # swap the last two letters
    with pytest.raises(SystemExit):
        main([*name.split()[1:], typo])
    assert f"did you mean {option}?" in capsys.readouterr().err


def test_every_option_has_help_text():
    missing = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"{len(missing)} option(s) without help text: " + "; ".join(missing)
