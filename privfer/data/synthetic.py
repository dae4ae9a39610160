"""A CREMA-D-like synthetic population: actors, clips, frame features, annotator votes.

The default data of privfer, so that everything runs with no download. The
generator is a small latent-variable model of a face video (docs/data.md):

* Expressions live in a latent space where the five non-neutral emotions are
  prototype directions whose correlations encode the confusions people make
  (anger ~ disgust, fear ~ sadness ~ disgust); neutral is the absence of
  expression, so weak displays drift towards neutral.
* Each actor has an identity, a camera/lighting offset in feature space, an
  expressiveness gain and an idiosyncratic way of showing each emotion: the
  client heterogeneity federated learning has to face.
* A clip follows the recording plan of CREMA-D (12 sentences; IEO at three
  intensities) and shows its expression with an onset, an apex and an offset;
  speech articulation and head-pose drift move the face throughout.
* Frame features are a fixed random nonlinear map of the latent state plus
  noise, standing in for a frozen per-frame extractor such as EmoNet.
* Annotators judge the displayed expression, not the acted one: their votes are
  drawn from a perception model, so the votes and the file-name label disagree
  about as often as CREMA-D's visual-only raters did.

Everything is deterministic given ``SyntheticConfig.seed``.
"""

from __future__ import annotations

import numpy as np

from privfer import EMOTIONS
from privfer.config import DataConfig
from privfer.data.clips import NUM_CLASSES, SENTENCES, Actor, ClipSet, clip_name, cremad_clip_plan
from privfer.errors import ConfigError

_NEUTRAL = EMOTIONS.index("neutral")

# Similarity of the five non-neutral prototypes (anger, disgust, fear, happiness,
# sadness). Encodes the confusions reported for posed faces (e.g. CREMA-D's
# visual-only confusion matrix): anger/disgust and fear/sadness are often mixed
# up, happiness rarely.
_EXPRESSIVE = [e for e in range(NUM_CLASSES) if e != _NEUTRAL]
_SIMILARITY = np.array(
    [
        # ANG   DIS   FEA   HAP   SAD
        [1.00, 0.55, 0.30, 0.00, 0.20],
        [0.55, 1.00, 0.30, 0.05, 0.35],
        [0.30, 0.30, 1.00, 0.00, 0.45],
        [0.00, 0.05, 0.00, 1.00, 0.00],
        [0.20, 0.35, 0.45, 0.00, 1.00],
    ]
)
# Sadness is a subtle display, happiness a strong one.
_PROTOTYPE_NORM = np.array([1.0, 1.0, 1.0, 1.15, 0.8])

# Displayed intensity by CREMA-D level; XX clips draw uniformly from this range.
_LEVEL_STRENGTH = {"LO": 0.55, "MD": 0.8, "HI": 1.1}
_XX_STRENGTH = (0.7, 1.0)

_IDENTITY_DIM = 16
_SPEECH_DIM = 8
_POSE_DIM = 4

# Frame labels for the IFER: expression frames at or above this envelope value
# carry the clip's emotion, frames below the lower one are neutral, in between
# (onset/offset) they are left unlabeled.
_APEX_LABEL_LEVEL = 0.6
_REST_LABEL_LEVEL = 0.15


def _prototypes(rng: np.random.Generator, latent_dim: int) -> np.ndarray:
    """(6, L) class prototypes; neutral is the zero vector."""
    chol = np.linalg.cholesky(_SIMILARITY)
    basis, _ = np.linalg.qr(rng.standard_normal((latent_dim, len(_EXPRESSIVE))))
    expressive = (chol @ basis.T) * _PROTOTYPE_NORM[:, None]
    protos = np.zeros((NUM_CLASSES, latent_dim))
    protos[_EXPRESSIVE] = expressive
    return protos


def _envelopes(rng: np.random.Generator, n: int, frames: int,
               apex_share: tuple[float, float] = (0.4, 0.7)) -> tuple[np.ndarray, np.ndarray]:
    """(n, T) expression envelopes in [0, 1] (onset, apex, offset, smoothed) and (n, 1) the middle of each apex."""
    t = np.arange(frames, dtype=np.float64)[None, :]
    # Actors express while speaking the sentence, so the apex covers most of a clip (a hard clip's is short).
    start = rng.uniform(0.0, 0.15, (n, 1)) * frames
    rise = np.maximum(rng.uniform(0.1, 0.3, (n, 1)) * frames, 1.0)
    apex = rng.uniform(*apex_share, (n, 1)) * frames
    fall = np.maximum(rng.uniform(0.1, 0.3, (n, 1)) * frames, 1.0)
    up = np.clip((t - start) / rise, 0.0, 1.0)
    down = np.clip((t - (start + rise + apex)) / fall, 0.0, 1.0)
    linear = up * (1.0 - down)
    return linear * linear * (3.0 - 2.0 * linear), start + rise + apex / 2  # smoothstep: no kinks at onset/offset


# Where the signal is in the frames' order (``order_signal``): three latent parts, and the two an emotion shows in
# turn. Anger and disgust show the same two parts in opposite orders, as do fear and sadness (the pairs raters
# confuse most); happiness has no mirror image.
_ORDER_PARTS = 3
_ORDER = {0: (0, 1), 1: (1, 0), 2: (0, 2), 3: (1, 2), 4: (2, 0)}  # index into _EXPRESSIVE -> (first, second)


def _order_maps(seed: int, protos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(L, L) maps taking a displayed expression to what the first and the second half of its apex show.

    The display is written in the basis of the expressive prototypes (least squares; the rest, clip noise
    outside their span, is shown in both halves). Prototype e's coefficient is shown along the unit part
    first(e) in the first half and second(e) in the second, at the mean norm of e and its mirror image (the
    emotion showing the same parts in the other order), so a pure display of anger
    and one of disgust of equal strength show the same two frames in opposite orders.
    """
    latent = protos.shape[1]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x4F524452]))  # "ORDR": apart from the world's stream
    parts, _ = np.linalg.qr(rng.standard_normal((latent, _ORDER_PARTS)))  # (L, 3) orthonormal
    expressive = protos[_EXPRESSIVE]  # (5, L)
    coefficients = np.linalg.pinv(expressive.T)  # (5, L): d -> w with expressive.T @ w the projection of d
    rest = np.eye(latent) - expressive.T @ coefficients
    norms = np.linalg.norm(expressive, axis=1)
    mirror = {e: next((m for m, pair in _ORDER.items() if pair == _ORDER[e][::-1]), e) for e in _ORDER}
    norms = np.array([(norms[e] + norms[mirror[e]]) / 2 for e in range(len(_EXPRESSIVE))])
    first = parts[:, [_ORDER[e][0] for e in range(len(_EXPRESSIVE))]] * norms  # (L, 5)
    second = parts[:, [_ORDER[e][1] for e in range(len(_EXPRESSIVE))]] * norms
    return first @ coefficients + rest, second @ coefficients + rest


def _in_order(displayed: np.ndarray, turn: np.ndarray, frames: int, share: float,
              maps: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(m, T, L) what each frame shows: ``1 - share`` of the display in every frame, and ``share`` of it as the
    first part before the middle of the apex and the second part after it."""
    first, second = (displayed @ m.T for m in maps)
    later = (np.arange(frames)[None, :] >= turn)[:, :, None]  # (m, T, 1)
    return (1.0 - share) * displayed[:, None, :] + share * np.where(later, second[:, None, :], first[:, None, :])


# Hard clips (``hard_fraction``): weak displays keep this share of their strength, blends take this share of the
# display from the most similar emotion (_SIMILARITY), and either keeps its apex for this share of the clip.
_HARD_WEAK = 0.45
_HARD_BLEND = 0.4
_HARD_APEX = (0.1, 0.2)


def _hard_clips(seed: int, share: float, intended: np.ndarray, strength: np.ndarray, own: np.ndarray,
                protos: np.ndarray, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Which clips are hard (``round(share x expressive clips)`` of them), their displays rewritten in place of
    ``own`` (strength x (prototype + idiosyncrasy)), and their short envelopes (None when there are none).

    A stream apart from the generator's others, so a population without hard clips is the one it always was."""
    hard = np.zeros(len(intended), dtype=bool)
    expressive = np.flatnonzero(intended != _NEUTRAL)
    count = int(round(share * len(expressive)))
    if count == 0:
        return hard, own, None
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x48415244]))  # "HARD"
    chosen = np.sort(rng.choice(expressive, count, replace=False))
    hard[chosen] = True
    blended = rng.random(count) < 0.5
    nearest = np.zeros(NUM_CLASSES, dtype=np.int64)  # each expressive class's most similar other one
    nearest[_EXPRESSIVE] = np.asarray(_EXPRESSIVE)[np.argmax(_SIMILARITY - np.eye(len(_EXPRESSIVE)), axis=1)]
    own = own.copy()
    blend, weak = chosen[blended], chosen[~blended]
    other = strength[blend, None] * protos[nearest[intended[blend]]]
    own[blend] = (1.0 - _HARD_BLEND) * own[blend] + _HARD_BLEND * other
    own[weak] = _HARD_WEAK * own[weak]
    envelopes = _envelopes(rng, count, frames, _HARD_APEX)
    return hard, own, envelopes


def generate_synthetic(config: DataConfig) -> ClipSet:
    """Generate the synthetic population described by ``config`` (deterministic)."""
    syn = config.synthetic
    frames, dim, latent = config.frames, config.feature_dim, syn.latent_dim
    root = np.random.SeedSequence([syn.seed, 0x5F4E5245])  # namespace: "privfer synthetic"
    world_rng, actor_rng, clip_rng, vote_rng = (np.random.default_rng(s) for s in root.spawn(4))

    # -- the world: prototypes, sentence articulation, the feature map -------
    protos = _prototypes(world_rng, latent)
    sentence_dirs = world_rng.standard_normal((len(SENTENCES), _SPEECH_DIM))
    sentence_dirs /= np.linalg.norm(sentence_dirs, axis=1, keepdims=True)
    total_latent = latent + _IDENTITY_DIM + _SPEECH_DIM + _POSE_DIM
    feature_map = world_rng.standard_normal((total_latent, dim)) / np.sqrt(total_latent / 3.0)
    feature_bias = world_rng.normal(0.0, 0.3, dim)

    # -- actors ---------------------------------------------------------------
    n_actors = syn.actors
    n_male = int(round(syn.male_fraction * n_actors))
    n_male = min(max(n_male, 1), n_actors - 1)
    sexes = np.array(["Male"] * n_male + ["Female"] * (n_actors - n_male))
    actor_rng.shuffle(sexes)
    actor_ids = np.arange(1001, 1001 + n_actors)
    actors = {
        int(a): Actor(actor_id=int(a), sex=str(s), age=int(actor_rng.integers(20, 75)))
        for a, s in zip(actor_ids, sexes)
    }
    identity = actor_rng.standard_normal((n_actors, _IDENTITY_DIM))
    camera = actor_rng.normal(0.0, 0.35, (n_actors, dim))
    gain = np.exp(actor_rng.normal(0.0, 0.25, n_actors))
    idiosyncrasy = actor_rng.standard_normal((n_actors, NUM_CLASSES, latent)) * (
        syn.actor_idiosyncrasy / np.sqrt(latent)
    )

    # -- the recording plan, minus a few missing clips ------------------------
    plan = cremad_clip_plan()
    rows = [(a, s, e, lv) for a in range(n_actors) for (s, e, lv) in plan]
    if syn.missing_clips:
        if syn.missing_clips >= len(rows):
            raise ConfigError(
                f"data.synthetic.missing_clips = {syn.missing_clips} leaves no clips (plan has {len(rows)})"
            )
        drop = set(clip_rng.choice(len(rows), syn.missing_clips, replace=False).tolist())
        rows = [r for i, r in enumerate(rows) if i not in drop]
    n = len(rows)
    actor_idx = np.array([r[0] for r in rows])
    sentence_idx = np.array([SENTENCES.index(r[1]) for r in rows])
    intended = np.array([r[2] for r in rows], dtype=np.int64)
    levels = [r[3] for r in rows]

    # -- the displayed expression of each clip --------------------------------
    strength = np.array(
        [_LEVEL_STRENGTH[lv] if lv in _LEVEL_STRENGTH else clip_rng.uniform(*_XX_STRENGTH) for lv in levels]
    )
    displayed = (strength * gain[actor_idx])[:, None] * (protos[intended] + idiosyncrasy[actor_idx, intended])
    hard, displayed, hard_envelopes = _hard_clips(syn.seed, syn.hard_fraction, intended, strength * gain[actor_idx],
                                                  displayed, protos, frames)
    displayed += clip_rng.standard_normal((n, latent)) * (syn.clip_noise / np.sqrt(latent))

    # -- frames: envelope x expression + identity + speech + pose + noise ------
    envelope, turn = _envelopes(clip_rng, n, frames)
    if hard_envelopes is not None:
        envelope[hard], turn[hard] = hard_envelopes
    t = np.arange(frames)[None, :]
    freq = clip_rng.uniform(1.0, 3.0, (n, 1))
    phase = clip_rng.uniform(0.0, 2 * np.pi, (n, 1))
    articulation = np.sin(2 * np.pi * freq * t / frames + phase)  # (n, T)
    pose = np.cumsum(clip_rng.normal(0.0, 0.15, (n, frames, _POSE_DIM)), axis=1)

    features = np.empty((n, frames, dim), dtype=np.float32)
    chunk = 512  # bounded memory for large populations
    frame_noise_latent = syn.frame_noise * 0.5 / np.sqrt(latent)
    order_maps = _order_maps(syn.seed, protos) if syn.order_signal else None
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        m = hi - lo
        if syn.order_signal:
            shown = _in_order(displayed[lo:hi], turn[lo:hi], frames, syn.order_signal, order_maps)
            expr = envelope[lo:hi, :, None] * shown
        else:
            expr = envelope[lo:hi, :, None] * displayed[lo:hi, None, :]
        expr = expr + clip_rng.standard_normal((m, frames, latent)) * frame_noise_latent
        state = np.concatenate(
            [
                syn.expression_strength * expr,
                np.broadcast_to(identity[actor_idx[lo:hi], None, :], (m, frames, _IDENTITY_DIM)),
                articulation[lo:hi, :, None] * sentence_dirs[sentence_idx[lo:hi], None, :],
                pose[lo:hi],
            ],
            axis=2,
        )
        h = state @ feature_map + feature_bias + camera[actor_idx[lo:hi], None, :]
        out = np.tanh(h) + clip_rng.standard_normal((m, frames, dim)) * syn.frame_noise
        features[lo:hi] = out.astype(np.float32)

    # -- annotators judge the displayed expression ----------------------------
    distance = ((displayed[:, None, :] - protos[None, :, :]) ** 2).sum(axis=2)
    logits = -distance / syn.perception_temperature
    logits -= logits.max(axis=1, keepdims=True)
    perceived = np.exp(logits)
    perceived /= perceived.sum(axis=1, keepdims=True)
    raters = vote_rng.integers(syn.min_annotators, syn.max_annotators + 1, n)
    votes = np.stack([vote_rng.multinomial(r, p) for r, p in zip(raters, perceived)]).astype(np.int64)

    # -- frame labels for the IFER --------------------------------------------
    frame_labels = np.full((n, frames), -1, dtype=np.int64)
    frame_labels[envelope < _REST_LABEL_LEVEL] = _NEUTRAL
    apex = envelope >= _APEX_LABEL_LEVEL
    frame_labels[apex] = np.broadcast_to(intended[:, None], (n, frames))[apex]
    frame_labels[intended == _NEUTRAL] = _NEUTRAL

    names = np.array([clip_name(int(actor_ids[a]), s, e, lv) for a, s, e, lv in rows])
    return ClipSet(
        names=names,
        features=features,
        votes=votes,
        intended=intended,
        actor_ids=actor_ids[actor_idx].astype(np.int64),
        actors=actors,
        frame_labels=frame_labels,
        meta={"source": "synthetic", "seed": syn.seed},
        flags={"hard": hard},
    )
