"""The bundle format on its own: schema, digest, confinement of every listed path, every listed file re-hashed.

The bundle under test is a copy of the committed fixture `tests/fixtures/old_bundle` with its manifest re-written
through `write_manifest` (so it has a digest); each test edits the copy.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rsd.bundle import (
    DIGEST_FILE,
    MANIFEST,
    bundle_file,
    format_manifest,
    listed_files,
    manifest_digest,
    read_manifest,
    verify_bundle,
    write_manifest,
)
from rsd.cli import main as cli
from rsd.errors import CheckpointError, RsdError
from rsd.io import sha256_file
from rsd.runtime.bundle import available_engines

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "old_bundle"
OLD = json.loads((FIXTURE / f"{MANIFEST}.json").read_text())
VALID = {**{k: v for k, v in OLD.items() if k not in ("tau", "gate_statistic")},  # today's manifests carry a "gate" object
         "gate": {"tau": OLD["tau"], "mode": "chunk", "statistic": OLD["gate_statistic"], "min_steps": 1}}


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    """A signed copy of the fixture bundle."""
    out = tmp_path / "bundle"
    shutil.copytree(FIXTURE, out)
    write_manifest(out, VALID)
    return out


def _write_raw(bundle: Path, manifest: object, sign: bool = True) -> None:
    """Write `manifest` as it is (no schema check), with a matching digest when `sign`."""
    text = json.dumps(manifest, indent=2) + "\n"
    (bundle / f"{MANIFEST}.json").write_text(text)
    if sign:
        (bundle / DIGEST_FILE).write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  {MANIFEST}.json\n")


def test_manifest_round_trip_digest_and_verification(bundle: Path) -> None:
    assert read_manifest(bundle) == VALID == verify_bundle(bundle)
    assert manifest_digest(bundle) == sha256_file(bundle / f"{MANIFEST}.json")
    assert (bundle / DIGEST_FILE).read_text() == f"{sha256_file(bundle / f'{MANIFEST}.json')}  {MANIFEST}.json\n"
    assert [e["path"] for e in listed_files(VALID)][:2] == ["draft.safetensors", "draft.json"]


def test_changed_missing_or_foreign_files_are_refused(bundle: Path) -> None:
    (bundle / "draft.onnx").write_bytes(b"graph!")
    with pytest.raises(CheckpointError, match="draft.onnx.*changed after export"):
        verify_bundle(bundle)
    (bundle / "draft.onnx").unlink()
    with pytest.raises(CheckpointError, match="lists this file"):
        verify_bundle(bundle)
    _write_raw(bundle, {"kind": "draft", "format_version": VALID["format_version"]})
    with pytest.raises(CheckpointError, match="kind 'bundle'"):
        read_manifest(bundle)


def test_edited_manifest_is_refused_and_an_unsigned_one_is_reported(bundle: Path) -> None:
    edited = copy.deepcopy(VALID)
    edited["exit_layer"] = edited["shapes"]["exit_layer"] = 2
    _write_raw(bundle, edited, sign=False)
    with pytest.raises(CheckpointError, match="edited after export"):
        verify_bundle(bundle)
    result = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert result.exit_code == 1 and "edited after export" in result.output and "exit layer" not in result.output
    (bundle / DIGEST_FILE).unlink()
    assert manifest_digest(bundle) is None and verify_bundle(bundle)["exit_layer"] == 2
    result = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert result.exit_code == 0 and "manifest digest: none recorded" in result.output
    (bundle / DIGEST_FILE).write_text("not a digest\n")
    with pytest.raises(CheckpointError, match=DIGEST_FILE):
        verify_bundle(bundle)


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.onnx", "tokenizer/../../outside.onnx", "./draft.onnx", "a//b.onnx",
                                  "C:/x.onnx", "dir\\x.onnx", ""])
def test_paths_outside_the_bundle_are_refused_before_anything_is_read(bundle: Path, path: str) -> None:
    (bundle.parent / "outside.onnx").write_bytes(b"not yours")
    manifest = copy.deepcopy(VALID)
    manifest["engines"][0]["files"][0]["path"] = path
    _write_raw(bundle, manifest)
    with pytest.raises(CheckpointError, match=r"engines\[0\]\.files\[0\]\.path"):
        verify_bundle(bundle)
    result = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert sha256_file(bundle.parent / "outside.onnx")[:16] not in result.output and "root:" not in result.output


def test_a_symlink_that_leaves_the_bundle_is_refused(bundle: Path) -> None:
    outside = bundle.parent / "outside.onnx"
    shutil.copy(bundle / "draft.onnx", outside)  # the same bytes: only the link's target gives it away
    (bundle / "draft.onnx").unlink()
    os.symlink(outside, bundle / "draft.onnx")
    with pytest.raises(CheckpointError, match="resolves to"):
        verify_bundle(bundle)
    with pytest.raises(CheckpointError, match="resolves to"):
        bundle_file(bundle, "draft.onnx")
    (bundle / "draft.onnx").unlink()
    os.symlink(bundle / "draft.ts", bundle / "draft.onnx")  # a link inside the bundle is fine; its hash then decides
    with pytest.raises(CheckpointError, match="changed after export"):
        verify_bundle(bundle)


def _without(key: str):
    def change(m: dict) -> None:
        del m[key]
    return change


def _set(*path_and_value):
    *path, value = path_and_value

    def change(m: dict) -> None:
        target = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


MALFORMED = [
    ("not JSON", "{", "not valid JSON"),
    ("a list", "[1, 2]", "JSON list"),
    ("a string", '"bundle"', "JSON str"),
    ("no kind", _without("kind"), "kind 'bundle'"),
    ("old version", _set("format_version", 0), "format version"),
    ("no gate", _without("gate"), "\"gate\" object"),
    *[(f"no {key}", _without(key), f"'{key}'") for key in ("rsd_version", "created", "main_fingerprint", "exit_layer",
                                                           "calibrated", "shapes", "draft_config",
                                                           "draft_parameters", "precision", "parity_inputs", "sources", "engines")],
    ("tau text", _set("gate", "tau", "abc"), "'gate.tau'"),
    ("tau bool", _set("gate", "tau", True), "'gate.tau'"),
    ("tau huge int", _set("gate", "tau", 10**400), "'gate.tau'"),
    ("gate a list", _set("gate", [0.5]), "\"gate\""),
    ("exit layer negative", _set("exit_layer", -1), "'exit_layer'"),
    ("exit layer float", _set("exit_layer", 3.0), "'exit_layer'"),
    ("unknown precision", _set("precision", "int8"), "'precision'"),
    ("calibrated text", _set("calibrated", "yes"), "'calibrated'"),
    ("shapes a list", _set("shapes", []), "'shapes'"),
    ("no hidden size", lambda m: m["shapes"].pop("hidden_size"), "'shapes.hidden_size'"),
    ("hidden size zero", _set("shapes", "hidden_size", 0), "'shapes.hidden_size'"),
    ("shapes exit layer differs", _set("shapes", "exit_layer", 4), "'shapes.exit_layer'"),
    ("levels differ from the tokenizer", _set("shapes", "levels", 5), "'shapes.levels'"),
    ("tokenizer not an object", _set("shapes", "tokenizer", 7), "'shapes.tokenizer'"),
    ("tokenizer even levels", _set("shapes", "tokenizer", "levels", 6), "'shapes.tokenizer'"),
    ("parity rows text", _set("parity_inputs", "rows", "64"), "'parity_inputs.rows'"),
    ("sources a dict", _set("sources", {}), "'sources'"),
    ("source without path", lambda m: m["sources"][0].pop("path"), r"'sources\[0\]\.path'"),
    ("source sha short", _set("sources", 0, "sha256", "abc"), r"'sources\[0\]\.sha256'"),
    ("source bytes negative", _set("sources", 0, "bytes", -1), r"'sources\[0\]\.bytes'"),
    ("required source missing", lambda m: m["sources"].pop(0), "draft.safetensors"),
    ("engine a list", _set("engines", 0, []), r"'engines\[0\]'"),
    ("unknown format", _set("engines", 0, "format", "tflite"), r"'engines\[0\]\.format'"),
    ("engine precision int8", _set("engines", 0, "precision", "int8"), r"'engines\[0\]\.precision'"),
    ("built text", _set("engines", 0, "built", "true"), r"'engines\[0\]\.built'"),
    ("built without files", _set("engines", 0, "files", []), r"'engines\[0\]\.files'"),
    ("files not a list", _set("engines", 0, "files", "draft.onnx"), r"'engines\[0\]\.files'"),
    ("parity missing", lambda m: m["engines"][0].pop("parity"), r"'engines\[0\]\.parity'"),
    ("parity text", _set("engines", 0, "parity", "token_agreement", "all"), r"'engines\[0\]\.parity\.token_agreement'"),
    ("decoder parity missing", lambda m: m["engines"][1]["parity"].pop("actions_max_abs"), r"'engines\[1\]\.parity\.actions_max_abs'"),
    ("export seconds text", _set("engines", 0, "export_seconds", "fast"), r"'engines\[0\]\.export_seconds'"),
]


def _write_malformed(bundle: Path, change) -> None:
    """Write the manifest of a MALFORMED row: its raw text, or VALID with its change applied."""
    if isinstance(change, str):
        (bundle / f"{MANIFEST}.json").write_text(change)
    else:
        manifest = copy.deepcopy(VALID)
        change(manifest)
        _write_raw(bundle, manifest)


@pytest.mark.parametrize(("change", "message"), [(c, m) for _, c, m in MALFORMED], ids=[name for name, _, _ in MALFORMED])
def test_malformed_manifests_are_checkpoint_errors_naming_the_field(bundle: Path, change, message: str) -> None:
    _write_malformed(bundle, change)
    with pytest.raises(CheckpointError, match=message):
        read_manifest(bundle)
    with pytest.raises(CheckpointError, match=message):
        verify_bundle(bundle)
    result = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert result.exit_code == 1 and "CheckpointError" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_inspect_verifies_before_it_prints(bundle: Path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert result.exit_code == 0 and "manifest digest: sha256" in result.output and "all file hashes verified" in result.output
    (bundle / "decoder_c8.ts").write_bytes(b"other")
    result = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert result.exit_code == 1 and "decoder_c8.ts" in result.output and "main model fingerprint" not in result.output


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def _paths(value: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path of a JSON value (to choose where to put a random value)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


UNREAD = {"normalisation", "draft_config", "versions", "inputs", "outputs", "tolerances", "batch_sizes", "tolerance", "note"}
PATHS = [p for p in _paths(VALID) if p and not UNREAD & set(map(str, p[1:]))]  # fields rsd reads (whole unread ones too)
TOP, DEEP = [p for p in PATHS if len(p) == 1], [p for p in PATHS if len(p) > 1]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.one_of(st.sampled_from(TOP), st.sampled_from(DEEP)), st.one_of(st.just("delete"), JSON)),
                      min_size=1, max_size=3))
def test_fuzzed_manifests_raise_nothing_but_rsd_errors(bundle: Path, edits: list) -> None:
    manifest = copy.deepcopy(VALID)
    for path, value in edits:
        target = manifest
        for key in path[:-1]:
            if not isinstance(target, (dict, list)) or (isinstance(target, dict) and key not in target) or (
                    isinstance(target, list) and not (isinstance(key, int) and key < len(target))):
                break
            target = target[key]
        else:
            if isinstance(target, dict) and path[-1] in target or (isinstance(target, list) and isinstance(path[-1], int)
                                                                   and path[-1] < len(target)):
                if value == "delete":
                    del target[path[-1]]
                else:
                    target[path[-1]] = value
    _write_raw(bundle, manifest)
    try:
        checked = verify_bundle(bundle)
        text = format_manifest(checked)
        assert checked["main_fingerprint"] in text and available_engines(bundle, "cpu")[-1] == "torch"
    except RsdError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=JSON)
def test_any_json_document_as_a_manifest_is_an_rsd_error(bundle: Path, document: object) -> None:
    _write_raw(bundle, document)
    with pytest.raises(RsdError):
        verify_bundle(bundle)


@pytest.mark.parametrize("name", ["unknown precision", "no shapes", "tau text", "engine a list", "not JSON"])
def test_malformed_manifests_are_refused_by_from_bundle_and_bench_latency(bundle: Path, tmp_path: Path, name: str) -> None:
    from conftest import make_tiny_main

    from rsd.runtime.policy import SpeculativePolicy

    change = next(c for n, c, _ in MALFORMED if n == name)
    _write_malformed(bundle, change)
    main = make_tiny_main()
    main.fingerprint = VALID["main_fingerprint"]
    with pytest.raises(CheckpointError):
        SpeculativePolicy.from_bundle(bundle, main=main)
    main.save(tmp_path / "policy")
    result = CliRunner().invoke(cli, ["bench-latency", "--bundle", str(bundle), "--main", str(tmp_path / "policy"), "--device", "cpu",
                                      "--iters", "1", "--warmup", "0"])
    assert result.exit_code == 1 and "CheckpointError" in result.output and "Traceback" not in result.output, result.output
