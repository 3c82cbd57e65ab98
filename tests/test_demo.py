"""`rsd demo --quick` end to end: every step runs and the report's figures are present and sane."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from rsd.cli import main


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    for section in ("Time per step", "Tokenizer", "Drafts by exit layer", "Latency", "Closed-loop evaluation"):
        assert section in markdown
    assert len(report["tokenizer"]["val_mse_by_layers"]) == 8
    assert report["bench"]["baseline_p50"] > 0
    assert report["bench"]["replay"]["speedup"] > 0 and 0.0 <= report["bench"]["replay"]["acceptance"] <= 1.0
    for layer in report["bench"]["speedup"].values():
        assert layer["speedup"] > 0
    for name in ("baseline", "speculative"):
        assert 0.0 <= report["eval"][name]["success_rate"] <= 1.0
    acceptance = report["eval"]["speculative"]["acceptance_rate"]
    assert 0.0 <= acceptance <= 1.0
    assert report["eval"]["baseline"]["acceptance_rate"] is None
    for entry in report["drafts"].values():
        assert 0.0 <= entry["draft"]["val_agreement"] <= 1.0
        assert math.isinf(entry["calibration"]["tau"]) or 0.0 <= entry["calibration"]["tau"] <= 1.0
    for path in ("bundle/manifest.json", "policy/policy.json", "tokenizer/tokenizer.json", "bench.png", "demos.hdf5"):
        assert (out / path).is_file(), path
