"""MP4 video in and out with PyAV (its wheels bundle FFmpeg, so no system FFmpeg is needed).

Frames are uint8 RGB `[T, H, W, 3]`. `VideoWriter` appends episodes to one file with continuous timestamps
(`pts = frame / fps`), as LeRobot v3 stores many episodes per file; `decode_video` returns every frame of a file
with its time in seconds, which readers match to the timestamps they need.

Two encoder settings are named (`VIDEO_SETTINGS`): `high` (H.264 4:4:4 at CRF 0, lossless in YUV: only the
RGB <-> YUV rounding is lost) and `lerobot` (what LeRobot's own writer uses: AV1 via SVT-AV1, 4:2:0, CRF 30,
GOP 2; small files that browsers play, visibly lossy).

Usage:
    with VideoWriter("cam.mp4", fps=20, settings=VIDEO_SETTINGS["high"]) as writer:
        start_seconds = writer.append(frames)                    # frames uint8 [T, H, W, 3]
    times, frames = decode_video("cam.mp4")                      # times [N] seconds, frames uint8 [N, H, W, 3]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import TracebackType

import numpy as np

from rsd.errors import ConfigError, DataError

CODECS = ("libx264", "libsvtav1")  # encoders PyAV's wheels ship that LeRobot's readers decode
PIXEL_FORMATS = ("yuv444p", "yuv420p")

log = logging.getLogger(__name__)


def require_av():  # noqa: ANN201 - returns the module
    """The `av` module, or a DataError saying how to install it."""
    try:
        import av
    except ImportError as error:
        raise DataError("LeRobot datasets need PyAV and pyarrow: expected `import av` to work, got ImportError; "
                        "install them with pip install 'rsd[lerobot]'.") from error
    return av


@dataclass(frozen=True)
class VideoSettings:
    """How frames are encoded: codec, pixel format, quality and keyframe interval."""

    codec: str = "libx264"  # FFmpeg encoder name, one of CODECS
    pix_fmt: str = "yuv444p"  # pixel format, one of PIXEL_FORMATS (libsvtav1 takes yuv420p only)
    crf: int = 0  # constant rate factor: 0 = lossless for libx264, 30 = LeRobot's AV1 default
    gop: int = 2  # keyframe every `gop` frames (LeRobot uses 2 so random access decodes few frames)

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ConfigError(f"VideoSettings.codec: expected one of {list(CODECS)}, got {self.codec!r}.")
        if self.pix_fmt not in PIXEL_FORMATS:
            raise ConfigError(f"VideoSettings.pix_fmt: expected one of {list(PIXEL_FORMATS)}, got {self.pix_fmt!r}.")
        if self.codec == "libsvtav1" and self.pix_fmt != "yuv420p":
            raise ConfigError(f"VideoSettings.pix_fmt: libsvtav1 encodes yuv420p only, got {self.pix_fmt!r}.")
        if not 0 <= self.crf <= 63:
            raise ConfigError(f"VideoSettings.crf: expected an int in 0..63, got {self.crf}.")
        if self.gop < 1:
            raise ConfigError(f"VideoSettings.gop: expected an int >= 1, got {self.gop}.")

    def options(self) -> dict[str, str]:
        """The encoder options PyAV passes to FFmpeg."""
        options = {"crf": str(self.crf), "g": str(self.gop)}
        if self.codec == "libsvtav1":
            options["preset"] = "12"  # LeRobot's speed preset
        return options


VIDEO_SETTINGS = {
    "high": VideoSettings(),
    "lerobot": VideoSettings(codec="libsvtav1", pix_fmt="yuv420p", crf=30, gop=2),
}


class VideoWriter:
    """An MP4 file that episodes are appended to; timestamps run on across episodes."""

    def __init__(self, path: str | Path, fps: int, settings: VideoSettings) -> None:
        av = require_av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = fps
        self.settings = settings
        self.frames = 0  # frames written so far
        self.bytes = 0  # encoded bytes so far (the file's size, less the container's index)
        self._container = av.open(str(self.path), "w", options={"movflags": "faststart"})
        self._stream = None

    def append(self, frames: np.ndarray) -> float:
        """Encode `frames` uint8 `[T, H, W, 3]` after the ones already written; return their start time in seconds."""
        av = require_av()
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or frames.shape[0] == 0:
            raise DataError(f"{self.path}: expected frames uint8 [T, H, W, 3] with T > 0, got {frames.dtype} {frames.shape}.")
        if self._stream is None:
            self._stream = self._container.add_stream(self.settings.codec, rate=self.fps, options=self.settings.options())
            self._stream.width, self._stream.height = frames.shape[2], frames.shape[1]
            self._stream.pix_fmt = self.settings.pix_fmt
            self._stream.codec_context.time_base = Fraction(1, self.fps)
        elif (frames.shape[1], frames.shape[2]) != (self._stream.height, self._stream.width):
            raise DataError(f"{self.path}: expected frames of {self._stream.height}x{self._stream.width} like the file's first, "
                            f"got {frames.shape[1]}x{frames.shape[2]}.")
        start = self.frames / self.fps
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            video_frame.pts = self.frames
            self.frames += 1
            self._mux(self._stream.encode(video_frame))
        return start

    def _mux(self, packets: list) -> None:
        for packet in packets:
            self.bytes += packet.size
            self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoder and finish the file."""
        if self._stream is not None:
            self._mux(self._stream.encode(None))
        self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None) -> None:
        self.close()


def resize_frame(frame: np.ndarray, size: int | None) -> np.ndarray:
    """A uint8 frame `[H, W, 3]` resized to `[size, size, 3]` with Pillow's Lanczos filter; unchanged when `size` is None or equal."""
    if size is None or frame.shape[:2] == (size, size):
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def resize_frames(frames: np.ndarray, size: int | None) -> np.ndarray:
    """Frames uint8 `[T, H, W, 3]` resized to `[T, size, size, 3]` (`resize_frame`); unchanged when `size` is None or equal."""
    if size is None or frames.shape[1:3] == (size, size):
        return frames
    return np.stack([resize_frame(frame, size) for frame in frames])


def decode_video(path: str | Path, what: str = "", size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every decodable frame of the first video stream: times `[N]` in seconds and uint8 RGB frames `[N, H, W, 3]`.

    A file FFmpeg cannot open or decode at all is a DataError naming `what` it holds (for example its episodes).
    Decoding stops at the first packet FFmpeg fails on (a truncated file: some FFmpeg versions drop the cut packet,
    others raise on it) and the frames before it are returned, logged; callers match the frames they need to
    timestamps, so a missing one is reported for the episode it belongs to. `size`: resize each frame to
    size x size as it is decoded (`resize_frame`).
    """
    av = require_av()
    path = Path(path)
    label = f"{path}{': ' + what if what else ''}"
    if not path.is_file():
        raise DataError(f"{label}: expected a video file, got no such file.")
    times, frames = [], []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise DataError(f"{label}: expected a video stream, got none.")
            for frame in container.decode(video=0):
                times.append(float(frame.time))
                frames.append(resize_frame(frame.to_ndarray(format="rgb24"), size))
    except av.FFmpegError as error:
        if not frames:
            raise DataError(f"{label}: expected a readable video, FFmpeg failed: {error}.") from error
        log.warning("%s: decoding stopped after %d frames (%.4f s): FFmpeg failed: %s.", label, len(frames), times[-1], error)
    if not frames:
        raise DataError(f"{label}: expected video frames, decoded none.")
    return np.asarray(times, dtype=np.float64), np.stack(frames)
