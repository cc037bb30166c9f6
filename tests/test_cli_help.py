"""Every command's --help is complete: a description, help text on every option, the default of every
option that has one, and the same words for the options the commands share."""

from __future__ import annotations

import argparse

import pytest

from lmforge.cli import build_parser, main


def commands(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # an alias maps to the same parser
                yield from commands(sub)


def options(parser: argparse.ArgumentParser):
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def test_every_option_has_help_and_states_its_default():
    for parser in commands(build_parser()):
        assert parser.description, f"{parser.prog}: no description"
        for action in options(parser):
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{name}: no help text"
            if action.default not in (None, False, argparse.SUPPRESS) and not action.required:
                assert "[default:" in action.help, f"{name}: default {action.default!r} not stated"


def test_shared_options_read_the_same_everywhere():
    seen: dict[str, set[str]] = {}
    for parser in commands(build_parser()):
        for action in options(parser):
            if "--device" in action.option_strings:
                seen.setdefault("--device", set()).add(action.help)
            if "--checkpoint" in action.option_strings:  # the same sentence after the kind of run
                seen.setdefault("--checkpoint", set()).add(action.help.split(":", 1)[1])
    assert len(seen["--device"]) == 1 and len(seen["--checkpoint"]) == 1, seen


def test_finetune_help_shows_finetunings_own_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--train.lr FLOAT peak learning rate" in text and "[default: 5e-05]" in text
    assert "[default: classify]" in text and text.startswith("usage: lmforge finetune [--config YAML]")


def test_no_command_says_where_to_start(capsys):
    assert main([]) == 2
    assert "start with `lmforge pretrain`" in capsys.readouterr().err
