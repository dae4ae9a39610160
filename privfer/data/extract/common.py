"""What every stage of extraction shares: the options (recorded in the manifest), a clip's report, the bounds
that keep hostile videos from exhausting memory or time, and the errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from privfer.errors import PrivferError

VIDEO_SUFFIXES = (".flv", ".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
MANIFEST = "extraction.json"
MANIFEST_VERSION = 1
KEEP_FRAMES_PER_SAMPLE = 4  # decoded frames kept per sampled frame while streaming: memory O(T), not O(clip)
MAX_SIDE = 1280  # larger frames are downscaled as they are decoded: memory per kept frame is bounded too
MAX_PIXELS = 8192 * 8192  # a stream with larger frames is refused before decoding
MAX_FRAMES = 200_000  # about 1.9 hours at 30 fps: a longer clip is reported, not decoded for ever
MAX_SAMPLED_FRAMES = 256  # --frames: 4 x 256 kept frames of at most 1280 px stay under 3 GB per worker
ENCODE_BATCH = 64  # crops per encoder call
NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision / EmoNet-style backbones
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # RGB in [0, 1]
    "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # RGB in [-1, 1]
}


class ExtractionError(PrivferError):
    """A user-facing extraction failure (missing extra, bad encoder, unusable folders)."""


class EncoderError(ExtractionError):
    """The encoder file does not load, or does not map (B, 3, S, S) crops to (B, D) finite features."""


@dataclass(frozen=True)
class ExtractOptions:
    """How frames become features; recorded in the manifest (a resumed run must use the same)."""

    frames: int = 16
    face: Literal["haar", "none"] = "haar"
    size: int = 256
    margin: float = 0.25
    smoothing: float = 0.6
    min_face_fraction: float = 0.5
    normalize: Literal["imagenet", "unit", "symmetric"] = "imagenet"

    def __post_init__(self) -> None:
        checks = [
            (2 <= self.frames <= MAX_SAMPLED_FRAMES, f"--frames must be in 2..{MAX_SAMPLED_FRAMES}, got {self.frames}"),
            (self.face in ("haar", "none"), f"--face must be haar or none, got {self.face!r}"),
            (16 <= self.size <= 512, f"--size must be in 16..512, got {self.size}"),
            (0.0 <= self.margin <= 2.0, f"--margin must be in [0, 2], got {self.margin}"),
            (0.0 <= self.smoothing < 1.0, f"smoothing must be in [0, 1), got {self.smoothing}"),
            (0.0 <= self.min_face_fraction <= 1.0,
             f"--min-face-fraction must be in [0, 1], got {self.min_face_fraction}"),
            (self.normalize in NORMALIZATIONS, f"--normalize must be one of {sorted(NORMALIZATIONS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ExtractionError(message)


@dataclass
class ClipReport:
    """What happened to one clip (one entry of extraction.json)."""

    clip: str
    source: str
    status: Literal["ok", "failed"] = "failed"
    frames_decoded: int = 0
    frames_sampled: int = 0
    short_clip: bool = False  # fewer decoded frames than T: frames repeat
    faces_found: int = 0
    fallback: Literal["none", "neighbour box", "centre crop"] = "none"
    boxes: list[list[int]] = field(default_factory=list)  # per sampled frame: x, y, side of the square crop
    error: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
