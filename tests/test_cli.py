"""The `rsd` command line: every command is registered, rsd's errors become one clear line."""

from __future__ import annotations

from click.testing import CliRunner

from rsd.cli import main

COMMANDS = ("bench-ar", "bench-latency", "bench-text", "calibrate", "collect-features", "demo", "eval", "export-draft", "generate-demos",
            "inspect", "inspect-main", "presets", "synthetic-actions", "train-ar-policy", "train-draft", "train-layer-draft", "train-policy",
            "train-text-lm", "train-tokenizer")


def test_help_lists_every_command() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
    for command in COMMANDS:
        assert CliRunner().invoke(main, [command, "--help"]).exit_code == 0, command


def test_rsd_errors_become_one_clear_line() -> None:
    result = CliRunner().invoke(main, ["presets", "tiyn"])
    assert result.exit_code == 1 and "ConfigError" in result.output and "Did you mean 'tiny'" in result.output
