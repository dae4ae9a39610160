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

from privfer.data.extract.common import MANIFEST, ClipReport, EncoderError, ExtractionError, ExtractOptions
from privfer.data.extract.decode import sample_frames
from privfer.data.extract.encoder import Encoder
from privfer.data.extract.faces import clip_crops, crop
from privfer.data.extract.run import extract, find_videos

__all__ = ["ClipReport", "Encoder", "EncoderError", "ExtractOptions", "ExtractionError", "MANIFEST", "clip_crops",
           "crop", "extract", "find_videos", "sample_frames"]
