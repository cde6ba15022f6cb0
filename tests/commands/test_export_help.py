"""``compactnn export --help`` says what each option is for."""

import argparse

from compactnn.commands import export as export_cmd


def _help(option: str) -> str:
    parser = argparse.ArgumentParser()
    sub = export_cmd.add_parser(parser.add_subparsers())
    action = next(a for a in sub._actions if option in a.option_strings)
    return " ".join(action.help.split())


def test_tokenizer_help_names_both_formats_that_take_it():
    text = _help("--tokenizer")
    # run() refuses --tokenizer for onnx and reads it for these two (docs/cli.md agrees)
    assert "gguf" in text and "compressed-tensors" in text
    assert "onnx" not in text


def test_every_command_that_shows_progress_takes_no_progress():
    """A CI script passes --no-progress to every command: export refused it (usage error)."""
    from compactnn import cli

    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    missing = [
        name
        for name, sub in commands.items()
        if name != "recipes" and not any("--no-progress" in a.option_strings for a in sub._actions)
    ]
    assert missing == []
