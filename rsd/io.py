"""Artifact files: safetensors weights beside a JSON manifest, hashing, strict state-dict checks, and the one way
every command writes its output.

Writing (docs/architecture.md, "Writing artifacts"): a command never writes into its `--out` directly. It writes
into a staging folder beside it (`.NAME.staging-PID-…`), every file is fsynced, and only then is the staging folder
renamed into place, so an interrupted or failed run leaves the old artifact as it was and no half-made one. An
existing non-empty `--out` is refused unless it holds an artifact of the same kind and `overwrite` is given
(`--overwrite`). Leftovers of a killed run (staging folders of dead processes) are removed by the next write to
the same place. `collect-features` is resumable: its staging folder has a fixed name (`.NAME.partial`) and is kept
when the run stops, so the next run with the same arguments finishes it. Single files (a calibration, a report)
are written to a temporary sibling and renamed over the target (`atomic_file`).

Usage:
    save_artifact(out_dir, "draft", module.state_dict(), {"config": to_dict(cfg)}, kind="draft")
    tensors, meta = load_artifact(out_dir, "draft", kind="draft")
    with staged_dir("runs/demo/policy", "policy", overwrite=False) as stage:
        main.save(stage)                      # moved to runs/demo/policy when the block ends without an error
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from rsd.errors import CheckpointError, ConfigError

FORMAT_VERSION = 1
ARTIFACT_MARKERS = (  # (kind, the file that marks a folder of that kind), checked in this order
    ("bundle", "manifest.json"),
    ("policy", "policy.json"),
    ("main_segments", "segments.json"),
    ("features", "index.json"),
    ("draft", "draft.json"),
    ("ar_policy", "ar_policy.json"),
    ("layer_draft", "layer_draft.json"),
    ("text_lm", "text_lm.json"),  # before "tokenizer": a text LM folder holds its BPE's tokenizer.json too
    ("tokenizer", "tokenizer.json"),
    ("demo", "report.json"),
    ("LeRobot dataset", "meta/info.json"),
)
F = TypeVar("F", bound=Callable[..., Any])


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_artifact(directory: str | Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], kind: str) -> Path:
    """Write `name.safetensors` and `name.json` (meta + kind, format version, weights sha256) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{name}.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(weights))
    manifest = {"kind": kind, "format_version": FORMAT_VERSION, **meta, "weights_sha256": sha256_file(weights)}
    (directory / f"{name}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return weights


def read_manifest(directory: str | Path, name: str, kind: str) -> dict[str, Any]:
    """Read `name.json`, checking it exists, is of `kind` and of this format version."""
    path = Path(directory) / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: expected a {kind} manifest, found no file. Point at a folder written by rsd.")
    meta = read_json(path, f"a {kind} manifest")
    if meta.get("kind") != kind:
        raise CheckpointError(f"{path}: expected kind {kind!r}, got {meta.get('kind')!r}.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: expected format version {FORMAT_VERSION}, got {meta.get('format_version')!r}. "
            "Re-create it with this version of rsd."
        )
    return meta


def load_artifact(directory: str | Path, name: str, kind: str, verify_hash: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load the tensors and the manifest written by `save_artifact`, verifying the weights' sha256."""
    meta = read_manifest(directory, name, kind)
    weights = Path(directory) / f"{name}.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: expected the {kind} weights beside {name}.json, found no file.")
    if verify_hash:
        found = sha256_file(weights)
        if found != meta.get("weights_sha256"):
            raise CheckpointError(f"{weights}: expected sha256 {meta.get('weights_sha256')}, got {found}; the file changed after it was written.")
    return load_file(str(weights)), meta


def check_state_dict(
    module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path
) -> None:
    """Refuse `tensors` unless they hold exactly the module's keys with the module's shapes."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: state dict does not match {type(module).__name__}: missing keys {missing}, unexpected keys {unexpected}."
        )
    for key, value in expected.items():
        if tuple(value.shape) != tuple(tensors[key].shape):
            raise CheckpointError(
                f"{source}: key {key!r} expected shape {tuple(value.shape)}, got {tuple(tensors[key].shape)}."
            )


def load_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Check `tensors` against `module` (`check_state_dict`) and assign them in place."""
    check_state_dict(module, tensors, source)
    module.load_state_dict(tensors, strict=True, assign=True)


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """Parse the JSON object in `path`; unreadable bytes, bad JSON or another JSON type is a CheckpointError."""
    try:
        data = json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: expected {what} (a JSON object), got text that is not valid JSON ({error}).") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected {what} (a JSON object), got a JSON {type(data).__name__}.")
    return data


def artifact_kind(folder: str | Path) -> str | None:
    """The kind of rsd artifact a folder holds, from the file that marks it (`ARTIFACT_MARKERS`), or None."""
    folder = Path(folder)
    return next((kind for kind, marker in ARTIFACT_MARKERS if (folder / marker).is_file()), None)


def check_out(out: str | Path, kind: str, overwrite: bool = False) -> None:
    """Refuse `out` unless it is new, an empty folder, or (with `overwrite`) a folder holding a `kind` artifact."""
    out = Path(out)
    if out.is_symlink():
        raise ConfigError(f"--out {out}: expected a folder, got a symbolic link; point --out at the folder it names, {out.resolve()}.")
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {out}: expected a folder for the {kind}, got an existing file. Choose another --out.")
    if not any(out.iterdir()):
        return
    found = artifact_kind(out)
    if found != kind:
        held = f"a {found}" if found else "files that are no rsd artifact"
        raise ConfigError(f"--out {out}: expected a new or empty folder (or a {kind} to replace with --overwrite), got a folder "
                          f"holding {held}. Choose another --out; rsd never writes into a folder of another kind.")
    if not overwrite:
        raise ConfigError(f"--out {out}: holds a {kind} already; pass --overwrite (overwrite=True) to replace it. The old "
                          "one stays intact until the new one is complete.")


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove staging folders beside `out` left by dead processes; put back a replaced artifact a killed swap left aside."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(staging|replaced)-(\d+)(-.*)?")
    for sibling in out.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match is None or _pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "replaced" and not out.exists():
            sibling.rename(out)
        else:
            shutil.rmtree(sibling)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` (and `root` itself) to the disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (renames into and out of it) to the disk."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _swap_in(stage: Path, out: Path) -> None:
    """Move the finished staging folder to `out`; an earlier artifact there is set aside first and removed after."""
    if out.exists():
        aside = out.parent / f".{out.name}.replaced-{os.getpid()}"
        out.rename(aside)
        stage.rename(out)
        _fsync_dir(out.parent)
        shutil.rmtree(aside)
    else:
        stage.rename(out)
        _fsync_dir(out.parent)


@contextmanager
def staged_dir(out: str | Path, kind: str, overwrite: bool = False, resumable: bool = False) -> Iterator[Path]:
    """Yield a staging folder beside `out`; when the block ends without an error, fsync it and move it to `out`.

    `out` is checked first (`check_out`). On an error the staging folder is removed, unless `resumable`: then it has
    the fixed name `.NAME.partial`, is kept, and the next call with the same `out` yields it again.
    """
    out = Path(os.path.abspath(out))
    if out.parent.is_dir():
        _remove_stale(out)
    check_out(out, kind, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    if resumable:
        stage = out.parent / f".{out.name}.partial"
        stage.mkdir(exist_ok=True)
    else:
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{os.getpid()}-", dir=out.parent))
    try:
        yield stage
        fsync_tree(stage)
        check_out(out, kind, overwrite)  # again: another process may have written `out` meanwhile
        _swap_in(stage, out)
    finally:
        if not resumable and stage.exists():
            shutil.rmtree(stage)


def writes_artifact(kind: str) -> Callable[[F], F]:
    """Make a function that writes a `kind` artifact into its `out` argument write through `staged_dir` instead.

    The decorated function receives the staging folder as `out`, which is moved into place when it returns, and
    takes one more keyword argument, `overwrite: bool = False` (`check_out`). Under torchrun, ranks other than 0
    (which write nothing) get a scratch folder, so they neither race rank 0 for `out` nor replace it.
    """

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args: Any, overwrite: bool = False, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 writes: the others get a scratch folder
                with tempfile.TemporaryDirectory(prefix=f"rsd-{kind}-rank") as scratch:
                    bound.arguments["out"] = Path(scratch)
                    return function(*bound.args, **bound.kwargs)
            with staged_dir(bound.arguments["out"], kind, overwrite) as stage:
                bound.arguments["out"] = stage
                return function(*bound.args, **bound.kwargs)

        extra = inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool")
        wrapper.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


@contextmanager
def atomic_file(path: str | Path, kind: str | None = None, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same suffix); when the block ends without an error, fsync it and rename it to `path`.

    With `kind`, an existing `path` must be a JSON file of that kind and `overwrite` true, else a ConfigError. Temporary
    files a killed process left beside `path` are removed.
    """
    path = Path(path)
    if kind is not None:
        check_file_out(path, kind, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.stem}.partial-*{path.suffix}"):
        match = re.fullmatch(rf"\.{re.escape(path.stem)}\.partial-(\d+)-.*", stale.name)
        if match is not None and not _pid_alive(int(match.group(1))):
            stale.unlink()
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.partial-{os.getpid()}-", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        temporary.replace(path)
        _fsync_dir(path.parent)
    finally:
        if temporary.exists():
            temporary.unlink()


def check_file_out(path: str | Path, kind: str, overwrite: bool = False) -> None:
    """Refuse an existing `path` unless it is a JSON file of `kind` and `overwrite` is given."""
    path = Path(path)
    if not path.exists():
        return
    found = _json_kind(path) if path.is_file() else None
    if found != kind:
        held = f"a file of kind {found!r}" if found else ("a folder" if path.is_dir() else f"a file that is no rsd {kind}")
        raise ConfigError(f"{path}: expected a new file (or a {kind} to replace with --overwrite), got {held}. Choose another path.")
    if not overwrite:
        raise ConfigError(f"{path}: holds a {kind} already; pass --overwrite (overwrite=True) to replace it.")


def refuse_existing_file(out: str | Path, overwrite: bool) -> None:
    """Refuse to replace an existing output file unless `overwrite` (--overwrite) is given."""
    if Path(out).exists() and not overwrite:
        raise ConfigError(f"--out {out}: exists already; pass --overwrite to replace it (the new file replaces it only once complete).")


def write_text_atomic(path: str | Path, text: str, kind: str | None = None, overwrite: bool = True) -> Path:
    """Write `text` to `path` through `atomic_file` (readers see the old file or the new one, never a part)."""
    with atomic_file(path, kind, overwrite) as temporary:
        temporary.write_text(text)
    return Path(path)


def _json_kind(path: Path) -> str | None:
    """The "kind" of a JSON object file, or None for anything else."""
    try:
        data = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data.get("kind") if isinstance(data, dict) and isinstance(data.get("kind"), str) else None
