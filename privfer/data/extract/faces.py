"""Faces: OpenCV's frontal-face Haar cascade per sampled frame, the box smoothed over time, the square crop."""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from privfer.data.extract import decode
from privfer.data.extract.common import ClipReport, ExtractionError, ExtractOptions
from privfer.errors import DataError, PrivferError


@functools.lru_cache(maxsize=1)
def _frontal_face_cascade():
    """OpenCV's frontal-face cascade, loaded once per process (not once per clip)."""
    cv2 = decode.video_stack()
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
        cv2 = decode.video_stack()
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
    cv2 = decode.video_stack()
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
        frames, total = decode.sample_frames(decode.decode_video(path), options.frames)
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
