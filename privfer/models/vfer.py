"""VFER (LSTM over frame features + linear head) and IFER (frozen per-frame classifier).

The VFER is split explicitly into a *base* (the recurrent encoder) and a
*head* (the classifier), so that personalization layers (FedPer) can keep the
head on the client and aggregate only the base. ``layer_groups`` lists the
groups from input to output; FedPer's "last N layers" are its last N entries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch
from torch import nn

from privfer.config import ModelConfig
from privfer.data.clips import NUM_CLASSES, ClipSet
from privfer.errors import DataError
from privfer.models.dp_lstm import FastDPLSTM


READOUTS = ("last", "mean", "both")


def read_out(states: torch.Tensor, readout: str) -> torch.Tensor:
    """(B, T, H) LSTM states -> the clip embedding: (B, H) for 'last' and 'mean', (B, 2H) for 'both' (the last
    state, then the mean)."""
    if readout == "last":
        return states[:, -1]
    if readout == "mean":
        return states.mean(dim=1)
    return torch.cat([states[:, -1], states.mean(dim=1)], dim=-1)


def _of_depth(names: list[str], index: int) -> list[str]:
    """The parameter names of an LSTM's layer ``index``: nn.LSTM names its tensors weight_ih_l0 ...; FastDPLSTM
    nests them as layers.0.ih.weight ..."""
    return [n for n in names if n.endswith(f"_l{index}") or n.startswith(f"layers.{index}.")]


class VFER(nn.Module):
    """Video FER: an LSTM over per-frame features, read out at the last step, the mean over the steps or both
    (the two concatenated, so the head weighs each), then a linear head.

    With ``shortcut`` the logits also get a linear map of the clip's mean frame feature (a zero-initialised
    skip connection around the LSTM, so the untrained model is the plain VFER). Under DP-SGD's noise the few
    shortcut weights learn from far fewer steps than the recurrent ones — "DP learning needs better features"
    (Tramer and Boneh, ICLR 2021) — while the LSTM still adds what the frames' order carries.
    """

    def __init__(
        self,
        feature_dim: int,
        hidden_size: int = 128,
        num_classes: int = NUM_CLASSES,
        num_layers: int = 1,
        readout: str = "last",
        dropout: float = 0.0,
        fast_dp: bool = False,
        shortcut: bool = False,
    ) -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got {readout!r}")
        self.feature_dim = feature_dim
        self.readout = readout
        if fast_dp:
            # Same parameters and function as nn.LSTM; per-sample gradients for Opacus in one einsum.
            self.lstm: nn.Module = FastDPLSTM(feature_dim, hidden_size, num_layers=num_layers)
        else:
            self.lstm = nn.LSTM(feature_dim, hidden_size, num_layers=num_layers, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size * (2 if readout == "both" else 1), num_classes)
        self.shortcut: nn.Linear | None = None
        if shortcut:
            self.shortcut = nn.Linear(feature_dim, num_classes)
            nn.init.zeros_(self.shortcut.weight)
            nn.init.zeros_(self.shortcut.bias)

    @classmethod
    def from_config(
        cls, config: ModelConfig, feature_dim: int, num_classes: int = NUM_CLASSES, private: bool = False
    ) -> "VFER":
        """The VFER a run uses (a :class:`DualStreamVFER` for ``architecture`` dual_stream); ``private`` (DP-SGD on)
        selects the fast DP layer when ``recurrent`` is auto."""
        fast = config.recurrent == "fast_dp" or (config.recurrent == "auto" and private)
        dual = config.architecture == "dual_stream"
        kind = DualStreamVFER if dual else VFER
        return kind(
            **({"key_frames": config.key_frames} if dual else {}),
            feature_dim=feature_dim,
            hidden_size=128 if config.hidden_size is None else config.hidden_size,  # None is resolved by PrivferConfig
            num_classes=num_classes,
            num_layers=config.num_layers,
            readout="last" if config.readout == "auto" else config.readout,  # auto is resolved by PrivferConfig
            dropout=config.dropout,
            fast_dp=fast,
            shortcut=config.shortcut is True,  # auto is resolved by PrivferConfig
        )

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, D) frame features -> (B, H) clip embedding from the base ((B, 2H) with the readout both)."""
        if frames.dim() != 3 or frames.shape[-1] != self.feature_dim:
            raise ValueError(f"expected (batch, frames, {self.feature_dim}) features, got {tuple(frames.shape)}")
        states, _ = self.lstm(frames)
        return read_out(states, self.readout)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, classes) logits."""
        return self.embed_and_classify(frames)[1]

    def embed_and_classify(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) -> the clip embedding (:meth:`embed`) and the logits (:meth:`forward`), from one pass."""
        embedding = self.embed(frames)
        logits = self.head(self.dropout(embedding))
        if self.shortcut is not None:
            logits = logits + self.shortcut(frames.mean(dim=1))
        return embedding, logits

    def stacked_forward(self, params: Mapping[str, torch.Tensor], frames: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for K stacked parameter sets of this model (each tensor with a leading client axis):
        (K, B, T, D) frames -> (K, B, classes) logits, nn.LSTM's function (gate order i, f, g, o) unrolled with
        batched matrix products. The stacked trainer (:mod:`privfer.fl.batched`) runs it: ``torch.func.vmap``
        cannot batch ``aten::lstm`` (no batching rule), so the model states its own forward twice, here, side by
        side, and tests/test_models.py holds them equal. No dropout (the stacked trainer refuses it)."""
        if isinstance(self.lstm, FastDPLSTM):
            raise ValueError("stacked_forward runs nn.LSTM's parameters; the fast DP-SGD layer trains per client")
        x = frames
        for layer in range(self.lstm.num_layers):
            w_ih, w_hh, b_ih, b_hh = (params[f"lstm.{kind}_l{layer}"]
                                      for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
            hidden = w_hh.shape[-1]
            projected = torch.einsum("kbtd,kgd->kbtg", x, w_ih) + (b_ih + b_hh)[:, None, None, :]
            h = x.new_zeros(x.shape[0], x.shape[1], hidden)
            c = torch.zeros_like(h)
            states = []
            for t in range(x.shape[2]):
                gates = projected[:, :, t] + torch.bmm(h, w_hh.transpose(1, 2))
                i, f, g, o = gates.chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                states.append(h)
            x = torch.stack(states, dim=2)
        embedding = read_out(x.flatten(0, 1), self.readout).unflatten(0, x.shape[:2])
        logits = torch.bmm(embedding, params["head.weight"].transpose(1, 2)) + params["head.bias"][:, None, :]
        if self.shortcut is not None:
            logits = logits + torch.bmm(frames.mean(dim=2), params["shortcut.weight"].transpose(1, 2)) \
                + params["shortcut.bias"][:, None, :]
        return logits

    def layer_groups(self) -> list[tuple[str, list[str]]]:
        """Parameter names grouped by layer, from input to output: the shortcut (it reads the input; FedPer keeps
        it local only with every LSTM layer), each LSTM layer, then the head."""
        lstm_names = [name for name, _ in self.lstm.named_parameters()]
        groups: list[tuple[str, list[str]]] = []
        if self.shortcut is not None:
            groups.append(("shortcut", [f"shortcut.{name}" for name, _ in self.shortcut.named_parameters()]))
        for index in range(self.lstm.num_layers):
            groups.append((f"lstm layer {index}", [f"lstm.{n}" for n in _of_depth(lstm_names, index)]))
        groups.append(("head", [f"head.{name}" for name, _ in self.head.named_parameters()]))
        return groups

    def personal_parameter_names(self, personal_layers: int = 1) -> list[str]:
        """Names of the parameters FedPer keeps local: those of the last ``personal_layers`` groups."""
        groups = self.layer_groups()
        if not 1 <= personal_layers < len(groups):
            raise ValueError(
                f"personal_layers must be between 1 and {len(groups) - 1} for this model, got {personal_layers}"
            )
        return [name for _, names in groups[-personal_layers:] for name in names]


class DualStreamVFER(VFER):
    """RDFER's dual-stream network (Liu, Wang, Shen, "Robust Dynamic Facial Expression Recognition", IEEE TBIOM
    2025) on per-frame features: a *synopsis* stream (the VFER's LSTM) reads the whole clip for the long-term
    course of the emotion, a *detail* stream (a second LSTM) reads only the clip's key segment for its short-term
    movements, and the head reads both embeddings side by side.

    The key segment (key-expression re-sampling) is the window of ``key_frames`` frames (half the clip when None)
    with the highest mean frame score, a score being the frame's distance from the clip's first frame (scaled to
    at most 1 in each clip: the apex, where the face is farthest from its onset, as apex spotting finds it) plus a
    learned linear score of the frame (``key_scorer``, zero at first). The window is chosen by argmax, which has no
    gradient; the scorer learns through the gate ``2 sigmoid(score)`` (1 at first) that scales each frame of the
    segment the detail stream reads. The paper leaves the predictor open; this one needs nothing but the clip.

    Each clip's segment, gate and embedding depend on that clip alone, and every parameterised layer is applied
    once per pass (the scorer to every frame, each stream's LSTM to its input), so per-sample gradients, Opacus's
    and the fast clipped sums' (:mod:`privfer.models.clipped_sums`), stay exact (tests/test_dual_stream.py).
    """

    def __init__(self, feature_dim: int, hidden_size: int = 128, num_classes: int = NUM_CLASSES, num_layers: int = 1,
                 readout: str = "last", dropout: float = 0.0, fast_dp: bool = False, shortcut: bool = False,
                 key_frames: int | None = None) -> None:
        super().__init__(feature_dim, hidden_size, num_classes, num_layers, readout, dropout, fast_dp, shortcut)
        if key_frames is not None and key_frames < 2:
            raise ValueError(f"key_frames must be at least 2, got {key_frames}")
        self.key_frames = key_frames
        self.key_scorer = nn.Linear(feature_dim, 1)
        nn.init.zeros_(self.key_scorer.weight)
        nn.init.zeros_(self.key_scorer.bias)
        if fast_dp:
            self.detail: nn.Module = FastDPLSTM(feature_dim, hidden_size, num_layers=num_layers)
        else:
            self.detail = nn.LSTM(feature_dim, hidden_size, num_layers=num_layers, batch_first=True)
        width = hidden_size * (2 if readout == "both" else 1)
        self.head = nn.Linear(2 * width, num_classes)  # the synopsis embedding, then the detail one

    def segment_length(self, frames: int) -> int:
        """Frames of the key segment for clips of ``frames`` frames."""
        wanted = max(2, frames // 2) if self.key_frames is None else self.key_frames
        return min(wanted, frames)

    def key_segment(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, D) -> each clip's key segment start (B,) and every frame's learned score (B, T)."""
        scores = self.key_scorer(frames).squeeze(-1)
        length = self.segment_length(frames.shape[1])
        with torch.no_grad():
            distance = (frames - frames[:, :1]).norm(dim=-1)
            distance = distance / distance.amax(dim=1, keepdim=True).clamp(min=1e-12)
            windows = (distance + scores).unfold(1, length, 1).mean(dim=-1)  # (B, T - length + 1)
            start = windows.argmax(dim=1)  # the first of tied windows
        return start, scores

    def embed(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> the synopsis stream's embedding, then the detail stream's ((B, 2H); (B, 4H) with the readout
        both)."""
        synopsis = super().embed(frames)
        start, scores = self.key_segment(frames)
        index = start[:, None] + torch.arange(self.segment_length(frames.shape[1]), device=frames.device)
        segment = frames.gather(1, index[..., None].expand(-1, -1, frames.shape[-1]))
        gate = 2 * torch.sigmoid(scores.gather(1, index))
        states, _ = self.detail(segment * gate[..., None])
        return torch.cat([synopsis, read_out(states, self.readout)], dim=-1)

    def stacked_forward(self, params: Mapping[str, torch.Tensor], frames: torch.Tensor) -> torch.Tensor:
        raise ValueError("the dual-stream model trains per client (the stacked trainer runs the VFER)")

    def layer_groups(self) -> list[tuple[str, list[str]]]:
        """The shortcut and the key scorer (they read the input), then each depth of LSTM layers, the synopsis and
        the detail stream's layer of that depth together (FedPer's last N layers stay the ones nearest the head),
        then the head."""
        groups = super().layer_groups()
        head = groups.pop()
        detail_names = [name for name, _ in self.detail.named_parameters()]
        scorer = ("key scorer", [f"key_scorer.{name}" for name, _ in self.key_scorer.named_parameters()])
        groups.insert(1 if self.shortcut is not None else 0, scorer)
        for index in range(self.detail.num_layers):
            position = next(i for i, (name, _) in enumerate(groups) if name == f"lstm layer {index}")
            groups[position] = (f"lstm layer {index}",
                                groups[position][1] + [f"detail.{n}" for n in _of_depth(detail_names, index)])
        groups.append(head)
        return groups


class IFER(nn.Module):
    """Image FER head: classifies one frame's features (the frozen teacher for pseudo labels).

    Shaped like EmoNet's emotion classifier (Linear -> BatchNorm -> ReLU -> Linear),
    fitted on training actors' frames or loaded from a weights file, then frozen.
    """

    def __init__(self, feature_dim: int, hidden: int = 128, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.net = nn.Sequential(
            nn.Linear(feature_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(..., D) frame features -> (..., classes) logits."""
        shape = frames.shape
        logits = self.net(frames.reshape(-1, shape[-1]))
        return logits.reshape(*shape[:-1], logits.shape[-1])

    @torch.no_grad()
    def frame_probabilities(self, clips: np.ndarray, batch: int = 4096) -> np.ndarray:
        """(N, T, D) clip features -> (N, T, classes) per-frame class probabilities."""
        self.eval()
        data = torch.as_tensor(np.asarray(clips, dtype=np.float32))
        outputs = [torch.softmax(self(data[i : i + batch]), dim=-1) for i in range(0, len(data), batch)]
        return torch.cat(outputs).numpy() if outputs else np.zeros((*data.shape[:2], NUM_CLASSES), np.float32)

    def freeze(self) -> "IFER":
        self.eval()
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return self

    def save(self, path: Path) -> None:
        torch.save({"feature_dim": self.feature_dim, "state_dict": self.state_dict()}, Path(path))

    @classmethod
    def load(cls, path: Path, feature_dim: int, hidden: int = 128) -> "IFER":
        """Load weights saved by :meth:`save` (or a bare state dict); a clear error if they do not fit."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"IFER weights file {path} does not exist")
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a corrupt file
            raise DataError(f"IFER weights file {path} cannot be read: {exc.__class__.__name__}") from None
        state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
        if not isinstance(state, dict):
            raise DataError(f"IFER weights file {path} does not hold a state dict")
        model = cls(feature_dim, hidden)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise DataError(
                f"IFER weights file {path} does not fit an IFER with feature_dim={feature_dim}, hidden={hidden}: {first}"
            ) from None
        return model.freeze()


def ifer_from_config(config: ModelConfig, training_clips: ClipSet, seed: int = 0) -> IFER:
    """The frozen IFER a run uses: loaded from ``config.ifer_weights``, or fitted on the training actors' frames."""
    if config.ifer_weights is not None:
        return IFER.load(config.ifer_weights, training_clips.feature_dim, config.ifer_hidden)
    frames, labels = training_clips.frame_level()
    return fit_ifer(frames, labels, hidden=config.ifer_hidden, seed=seed)


def fit_ifer(
    frames: np.ndarray,
    labels: np.ndarray,
    *,
    hidden: int = 128,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 512,
    seed: int = 0,
) -> IFER:
    """Fit the per-frame classifier on (frames, D) features and (frames,) labels, then freeze it."""
    frames = np.asarray(frames, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if len(frames) != len(labels) or len(frames) == 0:
        raise DataError(f"IFER needs matching, non-empty frames and labels ({len(frames)} vs {len(labels)})")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = IFER(frames.shape[1], hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    x, y = torch.from_numpy(frames), torch.from_numpy(labels)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            if len(batch) < 2:  # BatchNorm needs two frames
                continue
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    return model.freeze()
