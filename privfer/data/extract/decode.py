"""Decoding: a video's RGB frames (PyAV, OpenCV as the fallback), bounded in size and length, and T of them
sampled evenly while streaming."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from privfer.data.extract.common import (KEEP_FRAMES_PER_SAMPLE, MAX_FRAMES, MAX_PIXELS, MAX_SIDE,
                                         ExtractionError)
from privfer.errors import DataError


def video_stack():
    try:
        import cv2
    except ImportError:
        raise ExtractionError('reading videos needs the "video" extra: pip install -e ".[video]" '
                              "(opencv-python-headless>=4.8,<5, av, onnxruntime)") from None
    if not hasattr(cv2, "CascadeClassifier"):
        raise ExtractionError("this OpenCV has no CascadeClassifier (opencv 5 dropped it); install "
                              '"opencv-python-headless>=4.8,<5"')
    return cv2


def decode_video(path: Path) -> Iterator[np.ndarray]:
    """RGB uint8 frames (H, W, 3) of the first video stream, the longer side at most MAX_SIDE."""
    for index, frame in enumerate(_decode_full(path)):
        if index >= MAX_FRAMES:
            raise DataError(f"longer than {MAX_FRAMES} frames; cut the video into clips")
        side = max(frame.shape[:2])
        if side > MAX_SIDE:
            cv2 = video_stack()
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
    cv2 = video_stack()
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
