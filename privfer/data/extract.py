"""From videos to privfer's features: frames -> face crops -> a frozen encoder the user supplies -> T x D arrays.

``privfer data extract VIDEOS --encoder FILE --out DATASET`` reads every video
under VIDEOS (any container FFmpeg reads, through PyAV; OpenCV when PyAV is
missing), samples T frames evenly over each clip, finds the face in each frame
(OpenCV's frontal-face Haar cascade, shipped inside opencv-python-headless 4.x;
the largest face, a margin around it, the box smoothed over time; ``none``:
a centre crop), resizes the crop to the encoder's input size, runs the frozen
encoder (TorchScript or ONNX: a batch of RGB crops (B, 3, S, S) -> (B, D)) and
writes ``DATASET/features/<clip>.npy`` (T x D, float32) — exactly what
``privfer train/simulate --data DATASET`` read.

Nothing is silently written as garbage: a clip that cannot be decoded, has no
frames, or shows a face in fewer than ``min_face_fraction`` of its sampled
frames is reported in ``DATASET/extraction.json`` (per clip: frames decoded and
sampled, faces found, the fallback used, the error) and gets no features file.
Every file is written atomically; a re-run skips clips already extracted (an
interrupted run resumes) and refuses a dataset made with other options.

The video stack (PyAV, OpenCV, onnxruntime) is the optional extra ``video``:
``pip install -e ".[video]"``. privfer never bundles or downloads encoder weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np

from privfer.errors import DataError, PrivferError
from privfer.runs import atomic_write_text

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


# -- decoding ---------------------------------------------------------------------------------------------------


def _video_stack():
    try:
        import cv2
    except ImportError:
        raise ExtractionError('reading videos needs the "video" extra: pip install -e ".[video]" '
                              "(opencv-python-headless>=4.8,<5, av, onnxruntime)") from None
    if not hasattr(cv2, "CascadeClassifier"):
        raise ExtractionError("this OpenCV has no CascadeClassifier (opencv 5 dropped it); install "
                              '"opencv-python-headless>=4.8,<5"')
    return cv2


def _decode(path: Path) -> Iterator[np.ndarray]:
    """RGB uint8 frames (H, W, 3) of the first video stream, the longer side at most MAX_SIDE."""
    for index, frame in enumerate(_decode_full(path)):
        if index >= MAX_FRAMES:
            raise DataError(f"longer than {MAX_FRAMES} frames; cut the video into clips")
        side = max(frame.shape[:2])
        if side > MAX_SIDE:
            cv2 = _video_stack()
            scale = MAX_SIDE / side
            frame = cv2.resize(frame, (max(1, round(frame.shape[1] * scale)), max(1, round(frame.shape[0] * scale))),
                               interpolation=cv2.INTER_AREA)
        yield frame


def _decode_full(path: Path) -> Iterator[np.ndarray]:
    try:
        import av
    except ImportError:
        av = None
    if av is not None:
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise DataError("no video stream")
                for frame in container.decode(video=0):
                    if frame.width * frame.height > MAX_PIXELS:
                        raise DataError(f"frames of {frame.width} x {frame.height} pixels exceed {MAX_PIXELS}")
                    side = max(frame.width, frame.height)
                    if side > MAX_SIDE:  # scaled while converting: the full-size RGB frame is never made
                        scale = MAX_SIDE / side
                        yield frame.to_ndarray(width=max(1, round(frame.width * scale)),
                                               height=max(1, round(frame.height * scale)), format="rgb24")
                    else:
                        yield frame.to_ndarray(format="rgb24")
        except av.error.FFmpegError as exc:
            raise DataError(f"cannot decode: {exc.__class__.__name__}: {exc}") from None
        return
    cv2 = _video_stack()
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise DataError("cannot open the video")
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            if frame.shape[0] * frame.shape[1] > MAX_PIXELS:
                raise DataError(f"frames of {frame.shape[1]} x {frame.shape[0]} pixels exceed {MAX_PIXELS}")
            if frame.ndim == 2:
                frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
            yield cv2.cvtColor(frame[..., :3], cv2.COLOR_BGR2RGB)
    finally:
        capture.release()


def sample_frames(frames: Iterator[np.ndarray], count: int) -> tuple[list[np.ndarray], int]:
    """``count`` frames spread evenly over the clip, and how many frames it had.

    Streaming with O(count) memory: every ``stride``-th frame is kept, and when more than
    KEEP_FRAMES_PER_SAMPLE x count are kept, every other one is dropped and the stride doubles. The samples
    are the kept frames nearest to ``linspace(0, n - 1, count)``. A clip shorter than ``count`` repeats frames.
    """
    limit = KEEP_FRAMES_PER_SAMPLE * count
    kept: list[tuple[int, np.ndarray]] = []
    stride, total = 1, 0
    last: tuple[int, np.ndarray] | None = None
    for frame in frames:
        if total % stride == 0:
            kept.append((total, frame))
            if len(kept) > limit:
                kept = kept[::2]
                stride *= 2
        last = (total, frame)
        total += 1
    if last is None:
        return [], 0
    if kept[-1][0] != last[0]:
        kept.append(last)  # the clip's last frame is the last sample's target: never more than a stride away
    indices = np.array([i for i, _ in kept])
    targets = np.linspace(0, total - 1, count)
    chosen = [int(np.abs(indices - t).argmin()) for t in targets]
    return [kept[c][1] for c in chosen], total


# -- faces ------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _frontal_face_cascade():
    """OpenCV's frontal-face cascade, loaded once per process (not once per clip)."""
    cv2 = _video_stack()
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    if cascade.empty():
        raise ExtractionError("OpenCV's frontal-face cascade did not load (is opencv-python-headless 4.x installed "
                              "intact?)")
    return cascade


class FaceFinder:
    """The largest frontal face per frame (OpenCV Haar cascade), as a square box with a margin, smoothed."""

    def __init__(self, options: ExtractOptions) -> None:
        self.options = options
        self.cascade = _frontal_face_cascade() if options.face == "haar" else None

    def detect(self, frame: np.ndarray) -> tuple[float, float, float] | None:
        """(centre x, centre y, side) of the largest face, or None."""
        cv2 = _video_stack()
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        smallest = max(20, int(0.08 * min(gray.shape)))
        faces = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
        if len(faces) == 0:
            return None
        x, y, w, h = max(faces, key=lambda f: int(f[2]) * int(f[3]))
        return x + w / 2.0, y + h / 2.0, max(w, h) * (1.0 + self.options.margin)

    def boxes(self, frames: Sequence[np.ndarray], report: ClipReport) -> list[tuple[int, int, int]] | None:
        """One square box (x, y, side) per frame, or None when too few frames show a face."""
        if self.cascade is None:
            report.fallback = "centre crop"
            boxes = []
            for frame in frames:  # per frame: the resolution may change within a stream
                height, width = frame.shape[:2]
                side = min(height, width)
                boxes.append(((width - side) // 2, (height - side) // 2, side))
            return boxes
        found = [self.detect(frame) for frame in frames]
        report.faces_found = sum(f is not None for f in found)
        if report.faces_found == 0 or report.faces_found < self.options.min_face_fraction * len(frames):
            report.error = (f"a face in {report.faces_found} of {len(frames)} sampled frames (at least "
                            f"{self.options.min_face_fraction:.0%} needed)")
            return None
        # frames without a face take the nearest frame's box; then an exponential moving average both ways
        present = [i for i, f in enumerate(found) if f is not None]
        filled = [found[i] if found[i] is not None else found[min(present, key=lambda p: abs(p - i))]
                  for i in range(len(found))]
        if report.faces_found < len(frames):
            report.fallback = "neighbour box"
        smoothed = []
        for segment in _segments(filled):
            smoothed.extend(_smooth(segment, self.options.smoothing))
        return [(int(round(cx - s / 2)), int(round(cy - s / 2)), max(2, int(round(s)))) for cx, cy, s in smoothed]


def _segments(boxes: list[tuple[float, float, float]]) -> list[list[tuple[float, float, float]]]:
    """Runs of boxes without a jump (a cut, another face): the centre moves less than half the side."""
    runs = [[boxes[0]]]
    for previous, box in zip(boxes, boxes[1:]):
        jump = math.hypot(box[0] - previous[0], box[1] - previous[1]) > 0.5 * min(box[2], previous[2])
        if jump:
            runs.append([box])
        else:
            runs[-1].append(box)
    return runs


def _smooth(boxes: list[tuple[float, float, float]], alpha: float) -> list[np.ndarray]:
    """An exponential moving average run forwards and backwards, averaged: no lag at constant speed."""
    forward, state = [], np.array(boxes[0], dtype=float)
    for box in boxes:
        state = alpha * state + (1 - alpha) * np.array(box, dtype=float)
        forward.append(state)
    backward, state = [], np.array(boxes[-1], dtype=float)
    for box in reversed(boxes):
        state = alpha * state + (1 - alpha) * np.array(box, dtype=float)
        backward.append(state)
    return [(f + b) / 2 for f, b in zip(forward, reversed(backward))]


def crop(frame: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    """The square ``box`` of ``frame`` (zero padding where it leaves the frame), resized to size x size."""
    cv2 = _video_stack()
    x, y, side = box
    height, width = frame.shape[:2]
    canvas = np.zeros((side, side, 3), dtype=frame.dtype)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + side, width), min(y + side, height)
    if x1 > x0 and y1 > y0:
        canvas[y0 - y : y1 - y, x0 - x : x1 - x] = frame[y0:y1, x0:x1]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(canvas, (size, size), interpolation=interpolation)


def clip_crops(path: Path, options: ExtractOptions) -> tuple[np.ndarray | None, ClipReport]:
    """Decode, sample, find faces and crop one clip: (T, S, S, 3) uint8 crops, or None with the reason."""
    report = ClipReport(clip=path.stem, source=str(path))
    started = time.perf_counter()
    try:
        frames, total = sample_frames(_decode(path), options.frames)
    except DataError as exc:
        report.error = str(exc)
        return None, report
    except PrivferError:
        raise  # a missing extra or a broken install stops the run; it is no clip's fault
    except Exception as exc:  # noqa: BLE001 - a decoder's failure on one file is that clip's error, not the run's
        report.error = f"cannot decode: {exc.__class__.__name__}: {exc}"
        return None, report
    report.seconds["decode"] = time.perf_counter() - started
    report.frames_decoded, report.frames_sampled = total, len(frames)
    if not frames:
        report.error = "no frames"
        return None, report
    report.short_clip = total < options.frames
    started = time.perf_counter()
    boxes = FaceFinder(options).boxes(frames, report)
    report.seconds["detect"] = time.perf_counter() - started
    if boxes is None:
        return None, report
    report.boxes = [list(b) for b in boxes]
    return np.stack([crop(f, b, options.size) for f, b in zip(frames, boxes)]), report


# -- the encoder ------------------------------------------------------------------------------------------------


class Encoder:
    """A frozen frame encoder: TorchScript (``torch.jit.save``, .pt), torch.export (``torch.export.save``, .pt2)
    or ONNX (.onnx); (B, 3, S, S) float32 -> (B, D)."""

    def __init__(self, path: Path, options: ExtractOptions) -> None:
        self.path = Path(path)
        self.options = options
        if not self.path.is_file():
            raise EncoderError(f"--encoder {self.path} is not a file (a TorchScript .pt or an .onnx file)")
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
        self.dim: int | None = None
        mean, std = NORMALIZATIONS[options.normalize]
        self._mean = np.array(mean, dtype=np.float32).reshape(1, 3, 1, 1)
        self._std = np.array(std, dtype=np.float32).reshape(1, 3, 1, 1)
        if self.path.suffix.lower() == ".onnx":
            try:
                import onnxruntime
            except ImportError:
                raise ExtractionError('ONNX encoders need onnxruntime (the "video" extra)') from None
            try:
                self._session = onnxruntime.InferenceSession(str(self.path),
                                                             providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for any bad file
                raise EncoderError(f"--encoder {self.path} does not load as ONNX: {exc}") from None
            self._input = self._session.get_inputs()[0].name
            self._run = lambda batch: self._session.run(None, {self._input: batch})[0]
        elif self.path.suffix.lower() == ".pt2":
            import torch

            try:
                module = torch.export.load(str(self.path)).module()
            except Exception as exc:  # noqa: BLE001 - torch.export raises many types for bad files
                raise EncoderError(f"--encoder {self.path} does not load as a torch.export program (torch.export.save"
                                   f"): {exc.__class__.__name__}") from None
        else:
            import warnings

            import torch

            try:
                with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, and still reads fine
                    warnings.simplefilter("ignore", DeprecationWarning)
                    module = torch.jit.load(str(self.path), map_location="cpu").eval()
            except Exception as exc:  # noqa: BLE001 - torch.jit raises RuntimeError and others for bad files
                raise EncoderError(f"--encoder {self.path} does not load as TorchScript (torch.jit.save of a "
                                   f"scripted or traced module; .pt2 for torch.export, .onnx for ONNX): "
                                   f"{exc.__class__.__name__}") from None
        if self.path.suffix.lower() != ".onnx":

            def run(batch: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    out = module(torch.from_numpy(batch))
                if not isinstance(out, torch.Tensor):
                    raise EncoderError(f"the encoder returned {type(out).__name__}, not one tensor of (B, D)")
                return out.float().numpy()

            self._run = run
        self.probe()

    def probe(self) -> None:
        """Two blank crops through the model: the output shape and type are checked before any video is read."""
        try:
            self(np.zeros((2, self.options.size, self.options.size, 3), np.uint8))
        except EncoderError as exc:
            raise EncoderError(f"--encoder {self.path}: {exc}") from None

    def prepare(self, crops: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) uint8 RGB -> (B, 3, S, S) float32, scaled to [0, 1] and normalised."""
        batch = crops.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
        return np.ascontiguousarray((batch - self._mean) / self._std, dtype=np.float32)

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        """(B, S, S, 3) crops -> (B, D) float32 features, in batches of at most ENCODE_BATCH."""
        parts = [self._encode(crops[i : i + ENCODE_BATCH]) for i in range(0, len(crops), ENCODE_BATCH)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim or 0), np.float32)

    def _encode(self, crops: np.ndarray) -> np.ndarray:
        try:
            out = np.asarray(self._run(self.prepare(crops)))
        except EncoderError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever the user's model raises on our input
            shape = (len(crops), 3, self.options.size, self.options.size)
            text = " ".join(str(exc).split())[:300]  # one line, whatever the runtime printed
            raise EncoderError(f"the encoder failed on a batch of shape {shape}: {exc.__class__.__name__}: "
                               f"{text}") from None
        if out.ndim != 2 or out.shape[0] != len(crops) or out.shape[1] < 1:
            raise EncoderError(f"the encoder maps a batch of {len(crops)} crops to shape {tuple(out.shape)}; it must "
                               f"return ({len(crops)}, D) features (flatten or pool inside the exported model)")
        if out.dtype.kind != "f":
            raise EncoderError(f"the encoder returned {out.dtype} values; features must be floating point")
        if self.dim is not None and out.shape[1] != self.dim:
            raise EncoderError(f"the encoder returned {out.shape[1]} features, earlier {self.dim}")
        if not np.isfinite(out).all():
            raise EncoderError("the encoder returned NaN or infinite features")
        self.dim = out.shape[1]
        return out.astype(np.float32)


# -- the run ----------------------------------------------------------------------------------------------------


def find_videos(folder: Path) -> list[Path]:
    """Every video file under ``folder`` (recursively), sorted; clip names (file stems) must be unique."""
    if not folder.is_dir():
        raise ExtractionError(f"{folder} is not a folder of videos")
    videos = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise ExtractionError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) under {folder}")
    seen: dict[str, Path] = {}
    for video in videos:
        if video.stem in seen:
            raise ExtractionError(f"two videos would write the same clip {video.stem!r}: {seen[video.stem]} and {video}")
        seen[video.stem] = video
    return videos


def _atomic_save(path: Path, array: np.ndarray) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _complete(path: Path, frames: int, dim: int | None) -> bool:
    """A features file a previous run finished: float32, (frames, dim), finite (anything else is redone)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return (array.dtype == np.float32 and array.shape == (frames, dim) and bool(np.isfinite(array).all()))


def _copy_metadata(source: Path, out: Path) -> list[str]:
    copied = []
    for name in ("VideoDemographics.csv", "finishedResponses.csv", "processedResults"):
        item = source / name
        target = out / name
        if target.exists() or not item.exists():
            continue
        if item.is_dir():
            shutil.copytree(item, target)
        else:
            shutil.copy2(item, target)
        copied.append(name)
    return copied


def extract(
    videos: Path,
    encoder_path: Path,
    out: Path,
    options: ExtractOptions = ExtractOptions(),
    *,
    workers: int = 1,
    metadata: Path | None = None,
    on_clip: Callable[[ClipReport], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Extract every video under ``videos`` into ``out``; returns the manifest (also written to extraction.json).

    ``metadata``: a CREMA-D folder whose VideoDemographics.csv and processedResults/ are copied alongside
    (default: the videos folder's parent when it has VideoDemographics.csv, as in CREMA-D's own layout).
    """
    if workers < 1 or workers > 64:
        raise ExtractionError(f"--workers must be in 1..64, got {workers}")
    _video_stack()  # a missing extra stops here, not once per clip
    if options.face == "haar":
        FaceFinder(options)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExtractionError(f"--out {out} is a file; give a folder for the dataset")
    if metadata is not None and not (Path(metadata) / "VideoDemographics.csv").is_file():
        raise ExtractionError(f"--metadata {metadata} has no VideoDemographics.csv")
    paths = find_videos(Path(videos))
    encoder = Encoder(encoder_path, options)
    features = out / "features"
    manifest_path = out / MANIFEST
    settings = {"options": asdict(options), "encoder_sha256": encoder.sha256}
    manifest: dict[str, Any] = {"version": MANIFEST_VERSION, **settings, "encoder": str(encoder.path),
                                "feature_dim": encoder.dim, "clips": {}}
    if manifest_path.exists():
        try:
            previous = json.loads(manifest_path.read_text(encoding="utf-8"))
            same = {k: previous.get(k) for k in settings} == settings and isinstance(previous.get("clips"), dict)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise ExtractionError(f"{manifest_path} is unreadable; choose another --out") from None
        if not same:
            raise ExtractionError(f"{out} was extracted with other options or another encoder; use another --out "
                                  "(or the same --frames/--face/--size/--margin/--normalize and encoder file)")
        manifest["clips"] = previous["clips"]
    elif out.exists() and any(out.iterdir()):
        raise ExtractionError(f"{out} is not empty and holds no {MANIFEST} (nothing says how its files were made); "
                              "choose another --out")
    source = Path(metadata) if metadata is not None else Path(videos).parent

    def save_manifest() -> None:
        counts = {"ok": 0, "failed": 0}
        for entry in manifest["clips"].values():
            counts[entry["status"]] = counts.get(entry["status"], 0) + 1
        manifest["summary"] = {"videos": len(paths), **counts}
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")

    try:
        features.mkdir(parents=True, exist_ok=True)
        save_manifest()  # the options and encoder are on disk before the first features file
        manifest["metadata_copied"] = _copy_metadata(source, out) if (source / "VideoDemographics.csv").is_file() \
            else []
    except OSError as exc:
        raise ExtractionError(f"cannot write to {out}: {exc.strerror or exc}") from None
    # clips whose video is gone: their features were ours, and training must not read them
    names = {p.stem for p in paths}
    for clip in [c for c in manifest["clips"] if c not in names]:
        (features / f"{clip}.npy").unlink(missing_ok=True)
        del manifest["clips"][clip]
    todo = [p for p in paths if not (manifest["clips"].get(p.stem, {}).get("status") == "ok"
                                     and _complete(features / f"{p.stem}.npy", options.frames, encoder.dim))]
    if on_start is not None:
        on_start(len(paths), len(paths) - len(todo))
    try:
        _run(todo, options, workers, encoder, features, manifest, on_clip, save_manifest)
    finally:  # an interrupted run still records the clips it finished
        save_manifest()
    return manifest


def _run(todo, options, workers, encoder, features, manifest, on_clip, save_manifest) -> None:
    last_saved = time.monotonic()
    for crops, report in _crops_of(todo, options, workers):
        target = features / f"{report.clip}.npy"
        target.unlink(missing_ok=True)  # never a stale file: the entry and the file change together
        if crops is not None:
            started = time.perf_counter()
            try:
                vectors = encoder(crops)
            except EncoderError as exc:  # this clip's output (NaN, say); the shape was checked at startup
                report.error = f"encoder: {exc}"
            else:
                report.seconds["encode"] = time.perf_counter() - started
                _atomic_save(target, vectors)
                report.status = "ok"
        manifest["clips"][report.clip] = asdict(report)
        if on_clip is not None:
            on_clip(report)
        if time.monotonic() - last_saved > 5.0:
            save_manifest()
            last_saved = time.monotonic()


def _crops_of(paths: list[Path], options: ExtractOptions, workers: int) -> Iterator[tuple[np.ndarray | None, ClipReport]]:
    """Each clip's crops, in order; decoding and face finding in ``workers`` processes."""
    if workers == 1 or len(paths) < 2:
        for path in paths:
            yield clip_crops(path, options)
        return
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = [pool.submit(clip_crops, path, options) for path in paths[: 2 * workers]]
        at = len(pending)
        while pending:
            try:
                result = pending.pop(0).result()
            except BrokenProcessPool:
                raise ExtractionError("a worker process died (out of memory?); re-run to resume, perhaps with "
                                      "fewer --workers") from None
            if at < len(paths):
                pending.append(pool.submit(clip_crops, paths[at], options))
                at += 1
            yield result


__all__ = ["ClipReport", "Encoder", "EncoderError", "ExtractOptions", "ExtractionError", "MANIFEST", "clip_crops",
           "crop", "extract", "find_videos", "sample_frames"]
