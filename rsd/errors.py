"""The exceptions rsd raises: each message says what was expected, what arrived, and what to do."""

from __future__ import annotations


class RsdError(Exception):
    """Base class of every error rsd raises on purpose."""


class ConfigError(RsdError, ValueError):
    """A configuration field or preset name is invalid."""


class ShapeError(RsdError, ValueError):
    """A tensor crossing a module boundary has the wrong rank, size, dtype or values."""


class CheckpointError(RsdError):
    """A checkpoint or bundle file is missing, incomplete, of another version, or inconsistent."""


class DataError(RsdError, ValueError):
    """A dataset file or observation does not have the expected layout or content."""


class EngineError(RsdError):
    """An export engine cannot be built, loaded or run on this machine."""


class ParityError(EngineError):
    """An exported engine does not compute what the PyTorch module computes."""


class DeviceError(ConfigError, EngineError):
    """A requested device cannot be used here (CUDA asked for where torch.cuda.is_available() is false)."""


class ObservationError(DataError, ShapeError):
    """An observation (a dict, or a batch of images, instructions and proprio) has the wrong layout or content."""


def expect(condition: bool, error: type[RsdError], what: str, expected: object, got: object, fix: str = "") -> None:
    """Raise `error` naming the expected and the received value when `condition` is false."""
    if not condition:
        message = f"{what}: expected {expected}, got {got}."
        if fix:
            message += f" {fix}"
        raise error(message)
