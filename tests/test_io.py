"""Artifact files: safetensors + JSON round trip, hash, kind and version checks, strict state-dict loading, staged writes."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsd.errors import CheckpointError, ConfigError
from rsd.io import (
    atomic_file,
    check_out,
    load_artifact,
    load_strict,
    read_manifest,
    save_artifact,
    staged_dir,
    write_text_atomic,
    writes_artifact,
)


def test_artifact_round_trip_and_hash(tmp_path):
    layer = torch.nn.Linear(3, 2)
    save_artifact(tmp_path, "layer", layer.state_dict(), {"note": "x"}, kind="test")
    tensors, meta = load_artifact(tmp_path, "layer", kind="test")
    assert meta["note"] == "x" and torch.equal(tensors["weight"], layer.weight)
    data = bytearray((tmp_path / "layer.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "layer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_artifact(tmp_path, "layer", kind="test")


def test_artifact_kind_and_version_checked(tmp_path):
    save_artifact(tmp_path, "a", {"w": torch.zeros(1)}, {}, kind="test")
    with pytest.raises(CheckpointError, match="kind"):
        load_artifact(tmp_path, "a", kind="draft")
    manifest = json.loads((tmp_path / "a.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "a.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version"):
        load_artifact(tmp_path, "a", kind="test")


def test_load_strict_names_missing_and_unexpected_keys():
    layer = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match=r"missing keys \['bias'\].*unexpected keys \['extra'\]"):
        load_strict(layer, {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)}, "mem")
    with pytest.raises(CheckpointError, match="expected shape"):
        load_strict(layer, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "mem")


def test_check_out_accepts_new_empty_or_same_kind_with_overwrite(tmp_path):
    check_out(tmp_path / "new", "policy")
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", "policy")
    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "policy.json").write_text("{}")
    with pytest.raises(ConfigError, match="holds a policy already; pass --overwrite"):
        check_out(tmp_path / "policy", "policy")
    check_out(tmp_path / "policy", "policy", overwrite=True)
    with pytest.raises(ConfigError, match="holding a policy"):
        check_out(tmp_path / "policy", "tokenizer", overwrite=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match="no rsd artifact"):
        check_out(tmp_path / "notes", "draft", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="existing file"):
        check_out(tmp_path / "file", "draft", overwrite=True)
    (tmp_path / "link").symlink_to(tmp_path / "policy")
    with pytest.raises(ConfigError, match="symbolic link"):
        check_out(tmp_path / "link", "policy", overwrite=True)


def _tokenizer_folder(path, text):
    path.mkdir()
    (path / "tokenizer.json").write_text(text)


def test_staged_dir_swaps_in_only_a_complete_artifact(tmp_path):
    out = tmp_path / "tok"
    _tokenizer_folder(out, "old")
    with pytest.raises(RuntimeError, match="boom"), staged_dir(out, "tokenizer", overwrite=True) as stage:
        (stage / "tokenizer.json").write_text("half")
        raise RuntimeError("boom")
    assert (out / "tokenizer.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    with staged_dir(out, "tokenizer", overwrite=True) as stage:
        assert stage.parent == tmp_path and stage.name.startswith(".tok.staging-")
        (stage / "tokenizer.json").write_text("new")
    assert (out / "tokenizer.json").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_leftovers_of_a_killed_writer_are_cleaned_or_restored(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True).stdout)
    out = tmp_path / "tok"
    (tmp_path / f".tok.staging-{dead}-abc").mkdir()  # a staging folder of a killed writer
    _tokenizer_folder(tmp_path / f".tok.replaced-{dead}", "old")  # a swap killed between its two renames: out is missing
    (tmp_path / f".tok.staging-{os.getpid()}-live").mkdir()  # a running writer's folder is left alone
    with pytest.raises(ConfigError, match="--overwrite"), staged_dir(out, "tokenizer"):
        pass
    assert (out / "tokenizer.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tok.staging-{os.getpid()}-live", "tok"]


def test_writes_artifact_adds_overwrite_and_resumable_staging_is_kept(tmp_path):
    @writes_artifact("tokenizer")
    def write(value, out):
        Path(out, "tokenizer.json").write_text(value)
        return Path(out)

    assert "overwrite" in str(inspect.signature(write))
    assert write("a", tmp_path / "t").name.startswith(".t.staging-")
    with pytest.raises(ConfigError, match="--overwrite"):
        write("b", tmp_path / "t")
    write("b", out=tmp_path / "t", overwrite=True)
    assert (tmp_path / "t" / "tokenizer.json").read_text() == "b"
    with pytest.raises(KeyboardInterrupt), staged_dir(tmp_path / "f", "features", resumable=True) as stage:
        (stage / "shard").write_text("done")
        raise KeyboardInterrupt
    assert not (tmp_path / "f").exists() and (tmp_path / ".f.partial" / "shard").read_text() == "done"
    with staged_dir(tmp_path / "f", "features", resumable=True) as stage:
        assert (stage / "shard").read_text() == "done"
        (stage / "index.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["index.json", "shard"] and not (tmp_path / ".f.partial").exists()


def test_atomic_file_keeps_the_old_file_on_failure_and_checks_kind(tmp_path):
    path = tmp_path / "calibration.json"
    write_text_atomic(path, json.dumps({"kind": "calibration", "tau": 0.5}), kind="calibration", overwrite=False)
    with pytest.raises(ConfigError, match="--overwrite"):
        write_text_atomic(path, "{}", kind="calibration", overwrite=False)
    with pytest.raises(RuntimeError), atomic_file(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError
    assert json.loads(path.read_text())["tau"] == 0.5 and sorted(p.name for p in tmp_path.iterdir()) == ["calibration.json"]
    (tmp_path / "notes.json").write_text("[1]")
    with pytest.raises(ConfigError, match="no rsd calibration"):
        write_text_atomic(tmp_path / "notes.json", "{}", kind="calibration", overwrite=True)


@pytest.mark.parametrize(("text", "message"), [("{", "not valid JSON"), ("[]", "JSON list"), (b"\xff\xfe", "not valid JSON")])
def test_malformed_json_manifests_are_checkpoint_errors(tmp_path, text, message):
    path = tmp_path / "a.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(CheckpointError, match=message):
        read_manifest(tmp_path, "a", kind="test")
