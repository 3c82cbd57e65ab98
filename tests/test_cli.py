"""The `rsd` command line: every command is registered, rsd's errors become one clear line."""

from __future__ import annotations

from click.testing import CliRunner

from rsd.cli import main

COMMANDS = ("bench-latency", "calibrate", "check-expert", "collect-features", "convert", "demo", "eval", "export-draft", "generate-demos",
            "inspect", "inspect-main", "presets", "synthetic-actions", "train-draft", "train-policy", "train-tokenizer")


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


def test_options_of_another_environment_are_refused(tmp_path) -> None:
    out = str(tmp_path / "d.hdf5")
    for extra in (["--workers", "2"], ["--tasks", "0-3"]):
        result = CliRunner().invoke(main, ["generate-demos", "--episodes", "1", "--out", out, *extra])
        assert result.exit_code == 2 and "apply to libero:* environments" in result.output
    result = CliRunner().invoke(main, ["check-expert", "--env", "tabletop"])
    assert result.exit_code == 2 and "expected libero:<suite>" in result.output


def test_libero_demos_go_to_the_resumable_recorder(tmp_path, monkeypatch) -> None:
    import rsd.envs.libero_demos

    calls = []

    def fake(suite, episodes, out, **options):
        calls.append((suite, episodes, out, options))
        return {"episodes": 3, "failed": 1, "steps": 10, "seconds": 1.0, "steps_per_second": 10.0, "out": out, "per_task": {0: [2, 0], 1: [1, 1]}}

    monkeypatch.setattr(rsd.envs.libero_demos, "generate_libero_demos", fake)
    out = str(tmp_path / "d.hdf5")
    result = CliRunner().invoke(main, ["generate-demos", "--env", "libero:libero_spatial", "--tasks", "0-1", "--workers", "2", "--episodes", "2",
                                       "--out", out])
    assert result.exit_code == 0, result.output
    assert calls == [("libero_spatial", 2, out, {"tasks": [0, 1], "seed": 0, "image_size": 64, "workers": 2, "assets": None})]
    assert "per task (kept/failed): 0: 2/0, 1: 1/1" in result.output


def test_int_lists_take_ranges() -> None:
    from rsd.cli import _int_list

    assert _int_list("0,3,5-7") == [0, 3, 5, 6, 7] and _int_list("8, 16,24") == [8, 16, 24] and _int_list(None) is None


def test_option_choices_are_the_librarys() -> None:
    """The choices spelled out in the commands (so `rsd --help` imports no torch) are the ones the library checks."""
    from rsd.config import SELECT_BY
    from rsd.data.convert import TARGETS
    from rsd.data.source import IMAGE_CONVENTIONS, STATISTICS
    from rsd.data.video import VIDEO_SETTINGS

    def choices(command: str, option: str) -> list[str]:
        (param,) = [p for p in main.commands[command].params if p.name == option]
        return list(param.type.choices)

    assert choices("train-policy", "image_convention") == list(IMAGE_CONVENTIONS)
    assert choices("train-policy", "stats") == list(STATISTICS)
    assert choices("train-policy", "select_by") == list(SELECT_BY)
    assert choices("convert", "to") == list(TARGETS) and choices("convert", "video") == sorted(VIDEO_SETTINGS)
