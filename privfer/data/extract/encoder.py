"""The frozen frame encoder the user supplies: TorchScript, torch.export or ONNX; crops -> features."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from privfer.data.extract.common import (ENCODE_BATCH, NORMALIZATIONS, EncoderError, ExtractionError,
                                         ExtractOptions)


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
