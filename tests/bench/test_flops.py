"""FLOP accounting: a small config against a hand count (pruning included), OpenVLA-7B's 4.10 TFLOPs, the CogVLA table, the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import two_vit_config

from rsd.bench.flops import chunk_flops, flops_report, stage_flops
from rsd.cli import main
from rsd.config import CogVLAConfig
from rsd.errors import ConfigError
from rsd.models.cogvla import ROUTER_WIDTH


def llm_layer(tokens: int, width: int, mlp: int) -> int:
    """One Llama layer by hand: q, k, v, o (4 heads, no grouping) and the gated MLP, 2 FLOPs per multiply-add, plus
    attention scores and their product with the values over the whole sequence (2 * 2 * S^2 * D)."""
    return 2 * tokens * (4 * width * width + 3 * width * mlp) + 4 * tokens * tokens * width


def test_tiny_stages_match_a_hand_count_with_and_without_pruning() -> None:
    config = two_vit_config()
    width, mlp = config.llm.hidden_size, config.llm.intermediate_size
    plain = stage_flops(config, 128, 4, 256, exit_layer=2)
    tokens = plain["tokens_in"]
    assert plain["flops"]["prefix"] == 2 * llm_layer(tokens, width, mlp)
    assert plain["flops"]["suffix"] == 4 * llm_layer(tokens, width, mlp)
    # RFSQ head: Linear(width, H * 256) once, then Linear(256, L * d * V) for each of the H = 8 steps
    assert plain["flops"]["head"] == 2 * width * (8 * 256) + 2 * 8 * 256 * (8 * 16 * 7)
    pruned = stage_flops(two_vit_config(CogVLAConfig(lfp_layers=(1,))), 128, 4, 256, exit_layer=2)
    keep = 8  # round(16 * 0.5): one routing layer keeps the schedule's mean
    router = 2 * 16 * width * ROUTER_WIDTH + 2 * width * 2 * ROUTER_WIDTH + 2 * 16 * ROUTER_WIDTH  # down (16 tokens), FiLM (1 condition), score
    assert pruned["tokens_at_exit"] == tokens - (16 - keep)
    assert pruned["flops"]["prefix"] == llm_layer(tokens, width, mlp) + router + llm_layer(tokens - 8, width, mlp)
    assert pruned["flops"]["suffix"] == 4 * llm_layer(tokens - 8, width, mlp)
    assert pruned["flops"]["vision"] == plain["flops"]["vision"]


def test_chunk_flops_follow_the_acceptance() -> None:
    flops = {"vision": 10, "prefix": 20, "draft": 2, "suffix": 20, "head": 4}
    assert chunk_flops(flops, 0.7) == {"full": 54.0, "early_exit": 32 + 0.3 * 24}
    with pytest.raises(ConfigError, match="acceptance"):
        chunk_flops(flops, 1.5)


@pytest.mark.slow
def test_openvla_7b_is_4_10_tflops_and_cogvla_with_early_exit_is_under_30_percent() -> None:
    report = flops_report("openvla-7b", exit_layer=16, acceptance=0.7)
    plain = report["rows"][0]
    assert plain["tokens_in"] == 1 + 256 + 24 + 1
    assert round(plain["flops"]["vision"] / 1e12, 2) == 0.41
    assert round((plain["flops"]["prefix"] + plain["flops"]["suffix"]) / 1e12, 2) == 3.69
    assert round(plain["full"] / 1e12, 2) == 4.10
    assert [row["config"] for row in report["rows"]] == ["plain", "+aggregation", "+FiLM", "+MoE", "+LFP", "+CAtten"]
    assert report["rows"][1]["tokens_in"] == 1 + 64 + 24 + 1
    assert report["rows"][4]["tokens_at_exit"] == 1 + 38 + 24 + 1  # 64 → 54 → 48 → 38 visual tokens (routing before 5, 10, 15)
    assert report["rows"][-1]["early_exit_share"] <= 0.30


def test_cli_prints_the_flop_table_and_one_json_line_last() -> None:
    result = CliRunner().invoke(main, ["bench-latency", "--preset", "tiny", "--flops", "--exit-layers", "3", "--acceptance", "0.5"])
    assert result.exit_code == 0, result.output
    assert "| configuration |" in result.output and "| +LFP |" in result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert set(summary["flops"]) == {"plain", "+LFP", "+CAtten"} and summary["exit_layer"] == 3
    assert summary["flops"]["+LFP"]["full_tflops"] < summary["flops"]["plain"]["full_tflops"]
    refused = CliRunner().invoke(main, ["bench-latency", "--flops"])
    assert refused.exit_code != 0 and "--flops" in refused.output
