"""Every command's --help is complete: a description, help text on every option, the default of every
option that has one, and the same words for the options the commands share."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lmforge.cli import build_parser, main


ROOT = Path(__file__).resolve().parent.parent


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


def help_text(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def shown_sections(text: str) -> set[str]:
    """The config sections whose options a --help text lists."""
    return {line.split()[0][2:].split(".")[0] for line in text.splitlines()
            if line.startswith("  --") and "." in line.split()[0]}


@pytest.mark.parametrize("argv, sections", [
    (["finetune", "--help"], {"finetune", "peft", "robust", "train", "loss", "eval", "log"}),
    (["finetune", "--task", "dpo", "--help"], {"finetune", "peft", "train", "loss", "eval", "log"}),
    (["pretrain", "--help"], {"model", "data", "train", "loss", "eval", "log"}),
    (["pretrain", "--task=mlm", "--help"], {"model", "data", "mlm", "train", "loss", "eval", "log"}),
    (["train", "--config", str(ROOT / "configs/translate-multi30k.yaml"), "-h"],
     {"model", "data", "seq2seq", "train", "loss", "eval", "log"}),
])
def test_help_lists_the_sections_of_the_task_only(argv, sections, capsys):
    text = help_text(argv, capsys)
    assert shown_sections(text) == sections
    assert "every option: --help all" in text


def test_help_all_lists_every_section_and_hidden_options_still_parse(capsys):
    assert shown_sections(help_text(["finetune", "--help", "all"], capsys)) >= {"model", "mlm", "seq2seq", "span",
                                                                                "robust", "peft", "data"}
    args = build_parser("clm").parse_args(["pretrain", "--seq2seq.beam_size", "3"])  # hidden from --help, not refused
    assert vars(args)["seq2seq.beam_size"] == "3"


def test_help_lists_the_loss_options_of_the_tasks_losses(capsys):
    losses = {line.split()[0] for line in help_text(["finetune", "--task", "regress", "--help"], capsys).splitlines()
              if line.startswith("  --loss.")}
    assert losses == {"--loss.name", "--loss.delta"}  # mse, huber, smooth_l1, mae; no LM head to chunk
    assert "--loss.beta" in help_text(["finetune", "--task", "dpo", "--help"], capsys)


def test_help_of_an_unknown_task_is_one_line(capsys):
    assert main(["pretrain", "--task", "bogus", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "task = bogus: expected one of clm" in err


@pytest.mark.parametrize("preset, exports", [(None, False), ("bart-tiny", True)])
def test_the_closing_lines_offer_export_only_where_the_model_has_a_layout(preset, exports, tmp_path, capsys):
    from lmforge.cli import _print_next_steps
    from lmforge.config import load_config

    model = {"vocab_size": 100, **({"preset": preset} if preset else {})}
    _print_next_steps(load_config(base={"task": "seq2seq", "model": model}), tmp_path)
    out = capsys.readouterr().out
    assert "lmforge translate --checkpoint" in out and ("lmforge export" in out) == exports
