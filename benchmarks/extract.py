"""How fast `privfer data extract` turns videos into features, and where the time goes.

    python benchmarks/extract.py                 # 8 clips, workers 1 and 2, about 2 minutes
    python benchmarks/extract.py --clips 16 --frames 16 --size 224

Each clip is 2 seconds at 30 fps, 480 x 360 (CREMA-D's VideoFlash size),
MJPEG in AVI, showing a real face (scikit-image's astronaut) that moves across
the frame. The encoder is a ResNet-18 (11.2 M parameters, built here with
random weights and saved as TorchScript): the size of the frame encoders
users bring (EmoNet's backbone is of the same order). Prints, side by side in
one run for each worker count: clips per second end to end, and the seconds
per clip spent decoding, finding faces and encoding (decode and detect run in
the worker processes, encoding in the main one).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.down(x))


def resnet18(dim: int = 512) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if dim != 512:
        layers.append(nn.Linear(512, dim))
    return nn.Sequential(*layers).eval()


def write_clip(path: Path, offset: int) -> None:
    import cv2
    from skimage import data

    head = cv2.resize(data.astronaut()[20:220, 130:320], None, fx=0.7, fy=0.7)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (480, 360))
    rng = np.random.default_rng(offset)
    background = rng.integers(60, 120, (360, 480, 3), dtype=np.uint8)
    for t in range(60):
        frame = background.copy()
        x, y = 40 + offset * 7 + 3 * t, 60 + t
        frame[y : y + head.shape[0], x : x + head.shape[1]] = head
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    from privfer.data.extract import ExtractOptions, extract

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        videos = root / "videos"
        videos.mkdir()
        for k in range(args.clips):
            write_clip(videos / f"clip{k:03d}.avi", k)
        encoder = root / "resnet18.pt"
        torch.jit.save(torch.jit.trace(resnet18(), torch.zeros(2, 3, args.size, args.size)), str(encoder))
        options = ExtractOptions(frames=args.frames, size=args.size)
        print(f"{args.clips} clips of 60 frames (2 s at 30 fps, 480 x 360), T = {args.frames}, crops "
              f"{args.size} x {args.size}, ResNet-18 TorchScript encoder, torch threads {torch.get_num_threads()}")
        print(f"{'workers':>7} {'clips/s':>8} {'decode s/clip':>14} {'detect s/clip':>14} {'encode s/clip':>14}")
        for workers in [int(w) for w in args.workers.split(",")]:
            started = time.perf_counter()
            manifest = extract(videos, encoder, root / f"out{workers}", options, workers=workers)
            seconds = time.perf_counter() - started
            assert manifest["summary"]["ok"] == args.clips, manifest["summary"]
            split = {part: statistics.mean(c["seconds"].get(part, 0.0) for c in manifest["clips"].values())
                     for part in ("decode", "detect", "encode")}
            print(f"{workers:>7} {args.clips / seconds:>8.2f} {split['decode']:>14.3f} {split['detect']:>14.3f} "
                  f"{split['encode']:>14.3f}", flush=True)


if __name__ == "__main__":
    main()
