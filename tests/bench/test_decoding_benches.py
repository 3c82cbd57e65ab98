"""bench-text and bench-ar run end to end on tiny trained models and report exactness, acceptance and ratios (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from decoding_fixtures import ar_policy_dir, text_files, text_lm_dir  # noqa: F401  (session fixtures)

from rsd.bench.ar import run_bench_ar
from rsd.bench.text import TextBenchConfig, json_line, run_bench_text
from rsd.cli import main
from rsd.training.layer_draft import DraftTrainConfig, train_layer_draft_ar, train_layer_draft_text

QUICK = DraftTrainConfig(steps=2, batch_size=2, seq_len=32, memory_tokens=32, val_batches=1)


def test_bench_text_reports_exact_outputs_for_every_draft(text_lm_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    train_layer_draft_text(text_lm_dir, tmp_path / "two_layers", (0, 3), QUICK, transition_size=8, files=text_files())
    train_layer_draft_text(text_lm_dir, tmp_path / "knowledge", (0, 3), QUICK, transition_size=8, knowledge=True, files=text_files())
    config = TextBenchConfig(prompts=1, prompt_tokens=16, new_tokens=12, gamma=3, memory_tokens=32, repeats=2)
    report = run_bench_text(text_lm_dir, [tmp_path / "two_layers", tmp_path / "knowledge"], config, tmp_path / "bench.json", files=text_files())
    rows = report["variants"]
    assert set(rows) == {"plain", "two_layers", "knowledge"}
    for name in ("two_layers", "knowledge"):
        assert rows[name]["identical_outputs"] == "1/1"
        assert rows[name]["tokens_per_target_pass"] >= 1.0 and len(rows[name]["acceptance_by_position"]) == 3
    assert rows["knowledge"]["knowledge"] and report["knowledge_cache_build_ms"] > 0
    assert rows["plain"]["tokens_per_target_pass"] == 1.0 and rows["plain"]["cpu_time_speedup"] == 1.0
    assert "fastest of 2 interleaved run(s)" in report["markdown"]
    assert "| two_layers | 0,3 | no | no | 1/1 |" in report["markdown"]
    assert len(rows["knowledge"]["accepted_histogram"]) == 4 and sum(rows["knowledge"]["accepted_histogram"]) > 0
    assert json.loads((tmp_path / "bench.json").read_text())["variants"]["plain"]["speedup"] == 1.0
    assert json.loads(json_line(report))["bench"] == "text"


def test_bench_text_sampled_reports_acceptance_without_an_identity_check(text_lm_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    train_layer_draft_text(text_lm_dir, tmp_path / "draft", (0, 3), QUICK, transition_size=8, files=text_files())
    config = TextBenchConfig(prompts=1, prompt_tokens=16, new_tokens=10, gamma=2, memory_tokens=32, temperature=1.0, top_p=0.9)
    report = run_bench_text(text_lm_dir, [tmp_path / "draft"], config, files=text_files())
    row = report["variants"]["draft"]
    assert row["identical_outputs"] is None and "- (sampled)" in report["markdown"] and "top-p 0.9" in report["markdown"]
    assert 0.0 <= row["acceptance_rate"] <= 1.0 and row["tokens_per_target_pass"] > 1.0


def test_bench_text_command(text_lm_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: F811
    import rsd.bench.text as bench

    train_layer_draft_text(text_lm_dir, tmp_path / "draft", (0, 2), QUICK, transition_size=8, files=text_files())
    monkeypatch.setattr(bench, "stdlib_sources", lambda root=None: text_files())  # the tiny LM's corpus, not the whole stdlib
    result = CliRunner().invoke(main, ["bench-text", "--lm", str(text_lm_dir), "--draft", str(tmp_path / "draft"), "--prompts", "1",
                                       "--prompt-tokens", "8", "--new-tokens", "6", "--gamma", "2", "--memory-tokens", "16",
                                       "--plot", str(tmp_path / "bench.png")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["bench"] == "text"
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_bench_ar_closed_loop_is_identical(ar_policy_dir: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    policy, demos = ar_policy_dir
    train_layer_draft_ar(policy, demos, tmp_path / "draft", (0, 5), DraftTrainConfig(steps=2, batch_size=8, val_batches=1), 16, 0.25)
    report = run_bench_ar(policy, [tmp_path / "draft"], episodes=2, gamma=3, max_steps=4, json_path=tmp_path / "bench.json")
    row = report["variants"]["draft"]
    assert row["same_outcomes_as_plain"] == 2 and row["same_actions_as_plain"] == 2
    assert row["steps"] == 8 and row["layers"] == [0, 5]
    assert report["variants"]["plain"]["tokens_per_target_pass"] == 1.0
    assert "| draft | 0,5 |" in report["markdown"]
