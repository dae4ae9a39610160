"""Private hyperparameter selection (``privfer tune``): a declared space of candidates, each trained with the run's
mechanism, scored on the validation actors through the secure sum, the best chosen; the user's epsilon is the total.

What it costs, and why that is not Papernot & Steinke's bound. Papernot & Steinke
(ICLR 2022) and Liu & Talwar (STOC 2019) bound the cost of releasing ONLY the
best of a random number of training runs. A federated server aggregates every
round of every candidate — it must, to update the models — so it sees every
candidate's noisy sums. Against privfer's adversary, tuning therefore costs the
composition of every candidate trained, and a random number of repetitions K
can only cost more than a fixed one: the RDP of K runs' composition in
expectation is log E[exp((alpha - 1) K rho)] / (alpha - 1) >= E[K] rho
(Jensen). So privfer tries a FIXED, public set of N candidates (the product of
the declared space) and calibrates each to one per-candidate budget eps_c: the
largest with which the composition of all N, for a client that trains in every
round of every candidate, is within ``pilot_share`` x the user's epsilon (to
0.01 below). Under DP with N >= 2 and a share below 1 (default
:data:`PILOT_SHARE`), the candidates are pilots: once the argmax is chosen (a
public fact), its settings train once more at eps_f, the largest budget with
which the N pilots and that final run compose within the user's epsilon
(computed for every candidate before anything trains: it depends only on the
candidate's public shape). The final run's model is the result. With a share
of 1, one candidate or no DP, the chosen candidate's model is the result.

Scores. The validation actors are other persons than the training actors;
their records enter only the scores. Each validation client computes, with a
candidate's model, how many of its clips are predicted right (record level;
one record moves the count by at most 1) or the fraction it predicts right
(person level; one person moves the sum by at most 1), adds its noise share
and submits it to the secure sum: the server learns only the noisy total. Its
N releases are calibrated to the user's epsilon with the run's noise family
and trust (min_inputs, colluders), and written as a secure-sum ledger
(``validation_ledger.json``). The noise of a candidate's release is keyed (a
secret key kept in the tuning state until the run ends, the label, the model's
digest), and each release is recorded before it is made and made once: a run
killed inside a release, or whose scored model changed, or whose started
candidate was deleted, stops rather than release again. ``--validation consenting`` instead scores
with the exact validation macro F1, from validation actors declared as
consenting and not covered (the ledger's not_covered says so). Selection is
the argmax of the released scores: post-processing.

Candidates run with federation.adaptation off (phase 2 is not tuned; run
``privfer simulate`` with the chosen settings for it, which spends its own
budget) and with output.save_model on (their scores need the model).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import yaml

from privfer.config import PrivferConfig
from privfer.config.loading import build_config
from privfer.data.clips import ClipSet
from privfer.data.labels import evaluation_labels
from privfer.data import load_clips
from privfer.errors import ConfigError, RunDirectoryError
from privfer.fl.aggregation import round_context, sum_integer_contributions
from privfer.fl.federation import Federation, RunState, prepare_federation
from privfer.fl.rounds import TRAINING
from privfer.fl.simulation import LEDGER, predicted_classes, simulate
from privfer.metrics import classification_report
from privfer.privacy.calibrate import EPSILON_TOLERANCE, PrivacyBudgetError
from privfer.privacy.distributed import (DistributedPlan, calibrate_distributed, calibrate_plan, decode_sum,
                                         derived_key, encode_contribution, noise_generator)
from privfer.privacy.ledger import DistributedAccount, SecureSumLedger, build_distributed_ledger, read_ledger, \
    write_ledger
from privfer.privacy.ledger.tuning import (FINAL_RUN, MAX_CANDIDATES, MAX_SPACE_KEYS, MAX_VALUES, TUNABLE,
                                           TUNING_LEDGER_FILE, TUNING_SCHEMA, TuningLedger, parse_tuning_ledger)
from privfer.privacy.noise import NoiseSteps
from privfer.runs import atomic_write_json, prepare_run_dir

# the default space: the readout, the one setting where the transfer study found data that no public fact
# describes (a signal in the frames' order or in the last frames wants the last step's state; in the mean frame, the
# mean); the step stays the rule's, whose neighbours score within a run's spread of it (docs/performance.md). Two
# candidates: the config's own readout and the first of these that differs from it (the default both, then the mean;
# a third candidate would cost every pilot and the final run more noise than the pilots can rank through). The
# model's readouts are privfer.models.vfer.READOUTS
SPACE_READOUTS = ("mean", "last")
# under DP the candidates (pilots) together spend this share of epsilon; the chosen settings are then trained once
# more with what RDP composition leaves (noise about 1.11x a single run's at epsilon 3, against 1.41x for each of
# two candidates sharing the whole budget); docs/privacy-accounting.md, "The pilots and the final run"
PILOT_SHARE = 0.4


def default_space(config: PrivferConfig) -> dict[str, list[Any]]:
    """The VFER's readout: the config's own first (ties go to it), then the first of mean and last that differs from
    it (both: mean; mean: last; last: mean); every candidate trains at the step its config resolves
    (federation.server_lr, or the (256 / D)^(1/3) rule)."""
    own = config.model.readout
    return {"model.readout": [own, next(r for r in SPACE_READOUTS if r != own)]}


VALIDATION = "validation"  # the phase name of the score releases in validation_ledger.json
VALIDATION_LEDGER = "validation_ledger.json"
VALIDATION_PART = "val"  # the split part the validation actors' clips are in
SPACE_FILE = "space.json"
STATE_FILE = "tuning_state.json"
RESULT = "result.json"
CANDIDATES = "candidates"
FINAL = FINAL_RUN  # the final run's directory (the ledger's name for it)
SELECTION = ("the candidate with the largest released validation score (ties: the first); post-processing of the "
             "releases. The server aggregates every round of every candidate, so the cost charged is the composition "
             "of every candidate of the declared space and of the final run of the chosen settings, if any "
             "(Papernot & Steinke's and Liu & Talwar's repetition bounds cover releasing only the best candidate and "
             "do not apply)")
CONSENTING = ("the validation actors' clips: privfer tune --validation consenting scores every candidate with the "
              "exact validation macro F1, from validation actors declared as consenting to it (not covered by DP)")
EXACT_VIEW = ("the simulation's exact validation scores (each candidate's rounds.json per round, and result.json's "
              "validation_macro_f1): the researcher's view, computed outside the protocol on the validation actors' "
              "clips, never released to the server and not used to choose")
SCORES = {
    ("private", "record"): "the number of validation clips the candidate predicts right, released through the secure "
                           "sum with the validation clients' noise shares (one record moves it by at most 1)",
    ("private", "person"): "the sum over validation persons of the fraction of their clips the candidate predicts "
                           "right, released through the secure sum with their noise shares (one person moves it by "
                           "at most 1)",
    ("consenting", "record"): "the exact validation macro F1 (consenting validation actors)",
    ("exact", "record"): "the exact validation macro F1 (no DP)",
}
SCORES[("consenting", "person")] = SCORES[("consenting", "record")]
SCORES[("exact", "person")] = SCORES[("exact", "record")]


def parse_space(items: Iterable[str] | None) -> dict[str, list[Any]]:
    """``KEY=V1,V2,...`` items (each value read as YAML) as the search space; none: {} (:func:`default_space`)."""
    items = list(items or [])
    if not items:
        return {}
    space: dict[str, list[Any]] = {}
    for text in items:
        if "=" not in text:
            raise ConfigError(f"--try {text!r} must look like section.field=value1,value2")
        key, raw = (part.strip() for part in text.split("=", 1))
        if key not in TUNABLE:
            raise ConfigError(f"--try {key}: privfer tune searches only {', '.join(TUNABLE)}")
        if key in space:
            raise ConfigError(f"--try {key} is given twice")
        values = []
        for piece in raw.split(","):
            try:
                value = yaml.safe_load(piece) if piece.strip() else None
            except yaml.YAMLError:
                raise ConfigError(f"--try {key}: {piece!r} is not a YAML value") from None
            if isinstance(value, str):
                try:
                    value = float(value)  # YAML 1.1 reads 1e-2 as a string
                except ValueError:
                    pass
            if not isinstance(value, (bool, int, float, str)) or (isinstance(value, float) and not math.isfinite(value)):
                raise ConfigError(f"--try {key}: {piece.strip()!r} is not a number, true/false or a word")
            if value in values:
                raise ConfigError(f"--try {key}: {value!r} is listed twice")
            values.append(value)
        if len(values) > MAX_VALUES:
            raise ConfigError(f"--try {key}: {len(values)} values; at most {MAX_VALUES}")
        space[key] = values
    if len(space) > MAX_SPACE_KEYS:
        raise ConfigError(f"--try: {len(space)} keys; at most {MAX_SPACE_KEYS}")
    return space


def space_candidates(space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the space's values, in declaration order (the last key varies fastest)."""
    keys = list(space)
    return [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]


@dataclass
class Candidate:
    index: int
    settings: dict[str, Any]
    config: PrivferConfig  # the candidate's run config (privacy.epsilon: its budget)
    federation: Federation  # prepared at the user's epsilon: data, split, model builder, plans' shapes

    @property
    def run(self) -> str:
        return f"{CANDIDATES}/{self.index:02d}"


@dataclass
class TuningPlan:
    """Everything fixed before the first candidate trains (and written to the tuning ledger)."""

    space: dict[str, list[Any]]
    validation: str  # private | consenting | exact
    candidates: list[Candidate]
    budget: float | None  # each candidate's calibrated epsilon (None: no DP)
    composed: float | None  # the worst-case composition of every candidate at that budget
    delta: float | None
    validation_plan: DistributedPlan | None
    pilot_share: float | None = None  # the candidates' share of the budget (1: no final run; None: no DP)
    final_budgets: list[float] | None = None  # per candidate, the budget of its final run if it is chosen
    final_composed: list[float] | None = None  # per candidate, every candidate and its final run composed

    @property
    def final(self) -> bool:
        """Whether the chosen settings are trained once more (a final run) after the selection."""
        return self.final_budgets is not None

    def final_config(self, chosen: int) -> PrivferConfig:
        """The final run's config: the chosen candidate's at the budget left to it."""
        candidate = self.candidates[chosen]
        return _candidate_config(candidate.config.to_dict(), candidate.settings, candidate.index,
                                 {"privacy.epsilon": self.final_budgets[chosen]}, what="final run of candidate")


def _candidate_config(base: dict[str, Any], settings: dict[str, Any], index: int,
                      extra: dict[str, Any] | None = None, what: str = "candidate") -> PrivferConfig:
    raw = json.loads(json.dumps(base))
    for key, value in {**settings, "federation.adaptation": False, "output.save_model": True,
                       **(extra or {})}.items():
        section, name = key.split(".")
        raw[section][name] = value
    described = ", ".join(f"{k}={v}" for k, v in settings.items())
    return build_config(raw, source=f"{what} {index} ({described})")


def _setting(config: PrivferConfig, key: str) -> Any:
    section, name = key.split(".")
    value = getattr(getattr(config, section), name)
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def plan_tuning(config: PrivferConfig, space: dict[str, list[Any]], validation: str | None = None,
                clips: ClipSet | None = None, pilot_share: float | None = None) -> TuningPlan:
    """The candidates, their common budget, the final run's budget for each possible choice and the validation
    releases' plan; every mistake is raised here. An empty ``space`` is :func:`default_space`; ``pilot_share`` (DP
    only) defaults to :data:`PILOT_SHARE`."""
    private = config.privacy.enabled
    if private and config.mechanism != "distributed":
        raise ConfigError(f"privfer tune accounts the composition of the candidates' secure sums: it needs "
                          f"privacy.mechanism 'distributed' (this run's is {config.mechanism!r})")
    if validation is None:
        validation = "private" if private else "exact"
    if validation not in ("private", "consenting", "exact"):
        raise ConfigError(f"--validation must be private or consenting, got {validation!r}")
    if private == (validation == "exact"):
        raise ConfigError("--validation exact is for runs without DP" if private else
                          f"--validation {validation}: a run without DP scores its candidates exactly")
    if pilot_share is not None and not private:
        raise ConfigError("--pilot-share splits a privacy budget; this run has no DP (its chosen candidate is the "
                          "release)")
    if pilot_share is not None and not (isinstance(pilot_share, (int, float)) and not isinstance(pilot_share, bool)
                                        and 0.05 <= pilot_share <= 1):
        raise ConfigError(f"--pilot-share must be a number in [0.05, 1], got {pilot_share!r}")
    untunable = sorted(set(space or {}) - set(TUNABLE))
    if untunable:  # the trust, the mechanism and the data are the run's, never a candidate's
        raise ConfigError(f"the search space names {', '.join(untunable)}; privfer tune searches only "
                          f"{', '.join(TUNABLE)}")
    clips = load_clips(config.data) if clips is None else clips  # the mistakes above cost no data
    space = space or default_space(config)
    settings = space_candidates(space)
    if len(settings) > MAX_CANDIDATES:
        raise ConfigError(f"the search space declares {len(settings)} candidates; at most {MAX_CANDIDATES} (each one "
                          "costs budget)")
    base = config.to_dict()
    candidates, seen = [], {}
    for index, chosen in enumerate(settings):
        candidate_config = _candidate_config(base, chosen, index)
        resolved = {key: _setting(candidate_config, key) for key in chosen}  # as the config holds it (1 -> 1.0)
        if json.dumps(resolved, sort_keys=True) in seen:
            raise ConfigError(f"candidates {seen[json.dumps(resolved, sort_keys=True)]} and {index} are the same run "
                              f"({resolved}); each would be charged")
        seen[json.dumps(resolved, sort_keys=True)] = index
        candidates.append(Candidate(index, resolved, candidate_config, prepare_federation(candidate_config, clips)))
    space = {key: list(dict.fromkeys(c.settings[key] for c in candidates)) for key in space}  # the resolved values
    if not private:
        return TuningPlan(space, validation, candidates, None, None, None, None)
    deltas = {c.federation.delta for c in candidates}
    if len(deltas) != 1:
        raise ConfigError("the candidates' default deltas differ; set privacy.delta")
    delta = deltas.pop()
    epsilon = config.privacy.epsilon
    if len(candidates) == 1 and pilot_share is not None and pilot_share < 1:
        raise ConfigError(f"--pilot-share {pilot_share:g} needs two or more candidates: with one there is nothing to "
                          "choose, and it trains at the whole budget")
    share = 1.0 if len(candidates) == 1 else float(PILOT_SHARE if pilot_share is None else pilot_share)
    try:
        budget, composed = candidate_budget(share * epsilon, delta, candidates)
    except PrivacyBudgetError as exc:
        if share == 1:
            raise
        raise PrivacyBudgetError(f"{exc} (the candidates have the pilot share {share:g} of epsilon "
                                 f"{epsilon:g}: raise --pilot-share)") from None
    for candidate in candidates:
        candidate.config = _candidate_config(base, candidate.settings, candidate.index,
                                             {"privacy.epsilon": budget, "privacy.delta": delta})
    finals = None
    if share < 1:
        known: dict[str, tuple[float, float]] = {}  # candidates of one training shape have one final budget
        finals = []
        for candidate in candidates:
            plan = candidate.federation.plans[TRAINING]
            shape = json.dumps([candidate.config.privacy.model_dump(mode="json"),
                                candidate.config.aggregation.model_dump(mode="json"), plan.dimension, plan.steps,
                                plan.clients, plan.records, len(candidate.federation.clients[TRAINING])],
                               sort_keys=True)
            if shape not in known:
                try:
                    known[shape] = final_budget(epsilon, delta, candidates, budget, candidate)
                except PrivacyBudgetError as exc:
                    raise PrivacyBudgetError(f"{exc} (the final run has what the pilot share {share:g} of epsilon "
                                             f"{epsilon:g} leaves: lower --pilot-share)") from None
            finals.append(known[shape])
    validation_plan = None
    if validation == "private":
        validation_plan = plan_validation(config, delta, candidates[0].federation.parts[VALIDATION_PART],
                                          len(candidates))
    return TuningPlan(space, validation, candidates, budget, composed, delta, validation_plan, share,
                      [f[0] for f in finals] if finals else None, [f[1] for f in finals] if finals else None)



def _training_plan(config: PrivferConfig, shape: DistributedPlan, population: int, epsilon: float,
                   delta: float) -> DistributedPlan:
    trial = config.model_copy(deep=True)
    trial.privacy.epsilon = epsilon
    return calibrate_plan(trial, delta=delta, dimension=shape.dimension, steps=shape.steps, clients=shape.clients,
                          records=shape.records, population=population)


def composed_epsilon(entries: list[NoiseSteps | None], family, delta: float) -> float:
    """Epsilon of every entry composed (RDP): a client's spend over every run it trained in (inf when an entry is
    None: a run beyond the noise cap)."""
    if any(entry is None for entry in entries):
        return math.inf
    return family.epsilon(entries, delta)[0] if entries else 0.0


def candidate_budget(epsilon: float, delta: float, candidates: list[Candidate]) -> tuple[float, float]:
    """(eps_c, composed): the largest per-candidate budget whose worst-case composition over every candidate is
    within ``epsilon`` (to EPSILON_TOLERANCE below, or to 1e-4 in eps_c), and that composition."""
    shapes = [_shape(c) for c in candidates]
    family = shapes[0][1].family

    def composed(budget: float) -> float:
        return composed_epsilon([_entry(shape, budget, delta) for shape in shapes], family, delta)

    return largest_budget(composed, epsilon, epsilon / len(shapes),
                          f"epsilon {epsilon:g} split over {len(shapes)} candidates")


def final_budget(epsilon: float, delta: float, pilots: list[Candidate], pilot_budget: float,
                 final: Candidate) -> tuple[float, float]:
    """(eps_f, composed): the largest budget of the final run of ``final``'s settings such that it composed with
    every pilot (each at ``pilot_budget``) is within ``epsilon``, and that composition."""
    family = final.federation.plans[TRAINING].family
    spent = [_entry(_shape(c), pilot_budget, delta) for c in pilots]
    shape = _shape(final)

    def composed(budget: float) -> float:
        return composed_epsilon([*spent, _entry(shape, budget, delta)], family, delta)

    return largest_budget(composed, epsilon, epsilon / 2,
                          f"epsilon {epsilon:g} after {len(pilots)} pilots at {pilot_budget:.4g} each")


def _shape(candidate: Candidate) -> tuple[PrivferConfig, DistributedPlan, int]:
    return candidate.config, candidate.federation.plans[TRAINING], len(candidate.federation.clients[TRAINING])


def _entry(shape: tuple[PrivferConfig, DistributedPlan, int], budget: float, delta: float) -> NoiseSteps | None:
    """A training client's noise history over one run of ``shape`` calibrated to ``budget`` (None: beyond the noise
    cap)."""
    try:
        plan = _training_plan(*shape, budget, delta)
    except PrivacyBudgetError:
        return None
    return plan.steps_entry(plan.steps)


def largest_budget(composed: Callable[[float], float], epsilon: float, start: float,
                   what: str) -> tuple[float, float]:
    """The largest b in (0, epsilon] with composed(b) <= epsilon (to EPSILON_TOLERANCE below, or to 1e-4 in b), and
    composed(b). ``composed`` increases with b and is inf below the noise cap's edge; ``start`` is a first guess below
    the answer. PrivacyBudgetError when no b qualifies (``what`` says what was asked)."""
    high = epsilon
    spent = composed(high)
    if spent <= epsilon:
        return high, spent
    low = start
    for _ in range(30):
        spent = composed(low)
        if spent <= epsilon:
            break
        if math.isinf(spent):  # below the noise cap's edge: the least budget a run can have lies in (low, high]
            edge = high
            for _ in range(40):
                middle = (low + edge) / 2
                low, edge = (middle, edge) if math.isinf(composed(middle)) else (low, middle)
            low, spent = edge, composed(edge)
            if spent > epsilon:
                raise PrivacyBudgetError(
                    f"privacy budget unreachable: {what} needs more noise than privacy.max_noise_multiplier allows "
                    f"(at the least budget a run can have they compose to {spent:.3g}); try fewer values or raise "
                    "privacy.epsilon")
            break
        high, low = low, low / 2
    else:
        raise PrivacyBudgetError(f"privacy budget unreachable: {what}; try fewer values or raise privacy.epsilon")
    for _ in range(60):  # bisection: a fixed number of steps whatever the budget
        if spent >= epsilon - EPSILON_TOLERANCE or high - low < 1e-4:
            break
        middle = (low + high) / 2
        value = composed(middle)
        if value <= epsilon:
            low, spent = middle, value
        else:
            high = middle
    return low, spent


def plan_validation(config: PrivferConfig, delta: float, clips: ClipSet, releases: int) -> DistributedPlan:
    """The plan of the ``releases`` score sums of the validation clients, calibrated to the user's epsilon."""
    actors = clips.actor_list()
    if len(actors) < 2:
        raise ConfigError(f"private validation scores need at least 2 validation actors (the secure sum's minimum); "
                          f"this split has {len(actors)}: raise data.split.val_actors or use --validation consenting")
    person = config.privacy.unit == "person"
    privacy, aggregation = config.privacy, config.aggregation
    return calibrate_distributed(
        epsilon=privacy.epsilon, delta=delta, max_grad_norm=1.0, dimension=1, sample_rate=1.0, steps=releases,
        clients=len(actors), records=len(actors) if person else len(clips),
        min_inputs_fraction=aggregation.min_inputs_fraction, colluding_fraction=aggregation.colluding_fraction,
        rounding_overhead=privacy.rounding_overhead, modulus_bits=aggregation.modulus_bits,
        max_noise_multiplier=privacy.max_noise_multiplier, noise=privacy.noise)


def _load_model(run_dir: Path) -> RunState:
    path = run_dir / "model.pt"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = RunState(global_state=saved["global"], personal=saved["personal"], accounts={})
        state.newcomer_head = saved["newcomer_head"]
    except (OSError, KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise RunDirectoryError(f"{path} cannot be read ({exc.__class__.__name__}); delete the whole tuning run "
                                "directory to restart") from None
    return state


def validation_contributions(federation: Federation, state: RunState, unit: str) -> dict[int, float]:
    """What each validation client submits (before noise): its number of right predictions (record level) or the
    fraction it predicts right (person level)."""
    clips = federation.parts[VALIDATION_PART]
    right = predicted_classes(federation, state, clips, TRAINING) == evaluation_labels(
        clips, federation.config.data.eval_target)
    values = {}
    for actor in clips.actor_list():
        mine = right[clips.actor_ids == actor]
        values[actor] = float(mine.mean()) if unit == "person" else float(mine.sum())
    return values


def scored_model(state: RunState) -> dict[str, torch.Tensor]:
    """Every parameter a validation client scores with: the global model and (FedPer) the newcomers' head."""
    head = {f"newcomer_head/{name}": value for name, value in (state.newcomer_head or {}).items()}
    return {**state.global_state, **head}


def release_score(values: dict[int, float], plan: DistributedPlan, config: PrivferConfig, key: bytes,
                  label: str, model: dict[str, torch.Tensor]) -> float:
    """The noisy sum of the validation clients' values through secure aggregation. Each client's rounding and noise
    share come from ChaCha20 keyed by the run's validation key, the candidate's label and the digest of the model and
    plan it scored; :func:`tune` makes each release once. Under active security every client signs that digest:
    clients shown different models cannot share a sum."""
    context = round_context(model, plan)
    contributions = {actor: encode_contribution(np.array([value]), plan,
                                                noise_generator(derived_key(key, VALIDATION, label, context.hex(),
                                                                            actor)))
                     for actor, value in values.items()}
    nonce = hashlib.sha256(b"privfer/tuning-nonce/" + key).hexdigest()[:16]
    summed = sum_integer_contributions(contributions, None, config.aggregation, plan,
                                       round_id=f"tune:{nonce}:{label}:{VALIDATION}", context=context)
    if summed.aborted is not None:
        raise RuntimeError(f"the validation score of candidate {label} could not be aggregated: {summed.aborted}")
    return float(decode_sum(summed.total, plan)[0])


@dataclass
class TuneResult:
    """What ``privfer tune`` reports: every candidate's released score, the chosen one and its test scores."""

    chosen: int
    settings: dict[str, Any]
    validation: str
    target_epsilon: float | None
    candidate_epsilon: float | None
    epsilon_max: float | None  # training clients, composed over every candidate
    validation_epsilon_max: float | None
    delta: float | None
    candidates: list[dict[str, Any]]
    test: dict[str, Any]
    seconds: float
    not_covered: list[str] = field(default_factory=list)
    pilot_share: float | None = None  # the candidates' share of the budget (1: no final run)
    final_epsilon: float | None = None  # the final run's budget (None: the chosen candidate is the release)
    released: str = ""  # the run whose model and test scores are the result: 'final' or the chosen candidate's

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _state(run_dir: Path, plan: TuningPlan, noise_source: str, seed: int) -> dict[str, Any]:
    """The tuning state (budget, the validation key, scores released so far), created or checked against the plan."""
    path = run_dir / STATE_FILE
    if path.exists():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            budget, scores = state["budget"], {int(k): float(v) for k, v in state["scores"].items()}
            key = bytes.fromhex(state["key"])
            released = {int(k): str(v) for k, v in state["released"].items()}
            started = [int(k) for k in state["started"]]
            final_started = state.get("final_started", False) is True
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise RunDirectoryError(f"{path} is unreadable; delete {run_dir} to rerun") from None
        if budget != plan.budget:
            raise RunDirectoryError(f"{path} was planned with per-candidate epsilon {budget}, this run with "
                                    f"{plan.budget}; delete {run_dir} to rerun")
        return {"budget": budget, "key": key.hex(), "scores": scores, "released": released, "started": started,
                "final_started": final_started}
    folder = run_dir / CANDIDATES
    if (folder.is_dir() and any(folder.iterdir())) or (run_dir / FINAL).exists():
        raise RunDirectoryError(f"{run_dir} has candidates but no {STATE_FILE}: the validation releases made before "
                                "cannot be accounted; delete the run directory to restart")
    key = derived_key(str(seed).encode(), "tuning") if noise_source == "run_seed" else secrets.token_bytes(32)
    state = {"budget": plan.budget, "key": key.hex(), "scores": {}, "released": {}, "started": [],
             "final_started": False}
    _write_state(run_dir, state)
    return state


def _write_state(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_write_json(run_dir / STATE_FILE, {**state, "scores": {str(k): v for k, v in state["scores"].items()},
                                             "released": {str(k): v for k, v in state["released"].items()}})


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise RunDirectoryError(f"{path} cannot be read ({exc.strerror or exc})") from None


def tune(config: PrivferConfig, space: dict[str, list[Any]], run_dir: Path, *, validation: str | None = None,
         clips: ClipSet | None = None, pilot_share: float | None = None,
         on_start: Callable[[TuningPlan], None] | None = None,
         on_candidate: Callable[[Candidate, float, dict[str, Any]], None] | None = None,
         on_final: Callable[[PrivferConfig], None] | None = None) -> TuneResult:
    """Train every candidate of ``space``, release its validation score, choose the best and (under DP, with more
    than one candidate) train its settings once more with the budget left; write the candidates' and the final run's
    directories, the validation and tuning ledgers and result.json under ``run_dir`` (resumable)."""
    started = time.perf_counter()
    run_dir = Path(run_dir)
    clips = load_clips(config.data) if clips is None else clips
    plan = plan_tuning(config, space, validation, clips, pilot_share)
    resumed = prepare_run_dir(run_dir, config, "tune")
    declared = {"space": plan.space, "validation": plan.validation, "pilot_share": plan.pilot_share}
    space_path = run_dir / SPACE_FILE
    if resumed and space_path.exists():
        try:
            existing = json.loads(space_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise RunDirectoryError(f"{space_path} is unreadable; choose another --out") from None
        if isinstance(existing, dict):  # written before final runs: the candidates had the whole budget
            existing.setdefault("pilot_share", 1.0 if plan.budget is not None else None)
        if existing != declared:
            share = existing.get("pilot_share") if isinstance(existing, dict) else None
            hint = (f" (it was run with --pilot-share {share:g})" if isinstance(share, (int, float)) and
                    share != plan.pilot_share and existing.get("space") == plan.space else "")
            raise RunDirectoryError(f"{run_dir} holds a tuning run of another search space, validation or pilot "
                                    f"share{hint}; choose another --out")
    else:
        atomic_write_json(space_path, declared)
    if resumed and (run_dir / RESULT).exists():
        return read_tune_result(run_dir)
    if on_start is not None:
        on_start(plan)
    state = _state(run_dir, plan, config.privacy.noise_source, config.seed)
    key = bytes.fromhex(state["key"])
    results, exact = {}, {}
    for candidate in plan.candidates:
        candidate_dir = run_dir / candidate.run
        if candidate.index in state["started"] and not (candidate_dir / "run.json").exists():
            raise RunDirectoryError(
                f"{candidate.run} was removed after it started training: the sums its rounds released cannot be "
                "accounted if it trains again; the tuning run cannot continue (a new one spends a new budget)")

        def mark_started(federation: Any, done: int, total: int, index: int = candidate.index) -> None:
            if index not in state["started"]:  # its directory exists, no round has run: from now on it is charged
                state["started"].append(index)
                _write_state(run_dir, state)

        results[candidate.index] = simulate(candidate.config, candidate_dir, clips=clips, on_start=mark_started)
        model = _load_model(candidate_dir)
        scored = scored_model(model)
        # the researcher's view of a simulation: exact, never released, not used to choose (not_covered says so)
        exact[candidate.index] = _evaluate_validation(candidate.federation, model)["macro"]["f1"]
        digest = round_context(scored, plan.validation_plan).hex() if plan.validation_plan else None
        before = state["released"].get(candidate.index)
        if before is not None and before != digest:
            raise RunDirectoryError(
                f"candidate {candidate.index}'s validation score was released for another model (its run was "
                "retrained): the tuning run cannot continue (a new one spends a new budget)")
        if candidate.index not in state["scores"]:
            if plan.validation == "private":
                if before is not None:  # killed inside its release: another execution would be another release
                    raise RunDirectoryError(
                        f"candidate {candidate.index}'s validation release was interrupted, and its outcome is not "
                        "known to this run; releasing it again would be a second release the budget does not cover, "
                        "so the tuning run cannot continue (a new one spends a new budget)")
                state["released"][candidate.index] = digest  # written before the release: a kill cannot hide it
                _write_state(run_dir, state)
                values = validation_contributions(candidate.federation, model, config.privacy.unit)
                score = release_score(values, plan.validation_plan, config, key, str(candidate.index), scored)
            else:
                score = exact[candidate.index]
            state["scores"][candidate.index] = score
            _write_state(run_dir, state)
        if on_candidate is not None:
            on_candidate(candidate, state["scores"][candidate.index], results[candidate.index].test)
    scores = state["scores"]
    chosen = max(range(len(plan.candidates)), key=lambda i: (scores[i], -i))
    released = results[chosen]
    if plan.final:  # the chosen settings once more, with the budget the candidates left (composition, not a sum)
        final_config = plan.final_config(chosen)
        final_dir = run_dir / FINAL
        if state.get("final_started") and not (final_dir / "run.json").exists():
            raise RunDirectoryError(f"{FINAL} was removed after it started training: the sums its rounds released "
                                    "cannot be accounted if it trains again; the tuning run cannot continue")

        def mark_final(federation: Any, done: int, total: int) -> None:
            if not state.get("final_started"):
                state["final_started"] = True
                _write_state(run_dir, state)

        if on_final is not None:
            on_final(final_config)
        released = simulate(final_config, final_dir, clips=clips, on_start=mark_final)
    ledger, validation_ledger = tuning_ledgers(config, plan, run_dir, scores, chosen)
    if validation_ledger is not None:
        write_ledger(run_dir / VALIDATION_LEDGER, validation_ledger)
        ledger = parse_tuning_ledger({**ledger.document(),
                                      "validation_ledger_sha256": _sha256(run_dir / VALIDATION_LEDGER)})
    atomic_write_json(run_dir / TUNING_LEDGER_FILE, ledger.document())
    candidates = [{"index": c.index, "settings": c.settings, "score": scores[c.index],
                   "validation_macro_f1": exact[c.index]} for c in plan.candidates]
    result = TuneResult(
        chosen=chosen, settings=plan.candidates[chosen].settings, validation=plan.validation,
        target_epsilon=config.privacy.epsilon if config.privacy.enabled else None, candidate_epsilon=plan.budget,
        epsilon_max=ledger.epsilon_max,
        validation_epsilon_max=validation_ledger.epsilon_max if validation_ledger is not None else None,
        delta=plan.delta, candidates=candidates, test=released.test,
        seconds=time.perf_counter() - started, not_covered=list(ledger.not_covered), pilot_share=plan.pilot_share,
        final_epsilon=plan.final_budgets[chosen] if plan.final else None, released=FINAL if plan.final else
        plan.candidates[chosen].run)
    atomic_write_json(run_dir / RESULT, result.to_json())
    (run_dir / STATE_FILE).unlink(missing_ok=True)  # the validation key goes with it
    return result


def _evaluate_validation(federation: Federation, state: RunState) -> dict[str, Any]:
    clips = federation.parts[VALIDATION_PART]
    return classification_report(evaluation_labels(clips, federation.config.data.eval_target),
                                 predicted_classes(federation, state, clips, TRAINING))


def tuning_ledgers(config: PrivferConfig, plan: TuningPlan, run_dir: Path, scores: dict[int, float],
                   chosen: int) -> tuple[TuningLedger, SecureSumLedger | None]:
    """The tuning ledger (every candidate's ledger read back, composed per client and checked against the user's
    epsilon) and the validation ledger of the score releases."""
    private = plan.budget is not None
    entries: dict[tuple[int, str], list[NoiseSteps]] = {}
    counts: dict[tuple[int, str], int] = {}
    in_final: set[tuple[int, str]] = set()
    records, family = [], None

    def charge(path: Path, budget: float, is_final: bool = False) -> None:
        nonlocal family
        ledger = read_ledger(path)
        if not isinstance(ledger, SecureSumLedger) or not math.isclose(ledger.target_epsilon, budget, rel_tol=1e-12):
            raise RuntimeError(f"{path} is not a secure-sum ledger at epsilon {budget}")
        family = ledger.family
        for entry in ledger.clients:
            entries.setdefault((entry.client, entry.phase), []).extend(entry.noise_steps)
            if is_final:
                in_final.add((entry.client, entry.phase))
            else:
                counts[(entry.client, entry.phase)] = counts.get((entry.client, entry.phase), 0) + (
                    1 if entry.rounds_trained else 0)

    for candidate in plan.candidates:
        path = run_dir / candidate.run / LEDGER
        if private:
            charge(path, plan.budget)
        else:
            read_ledger(path)
        records.append({"index": candidate.index, "settings": candidate.settings, "epsilon": plan.budget,
                        "run": candidate.run, "ledger_sha256": _sha256(path), "score": scores[candidate.index]})
    final = None
    if plan.final:
        path = run_dir / FINAL / LEDGER
        charge(path, plan.final_budgets[chosen], is_final=True)
        final = {"settings": plan.candidates[chosen].settings, "epsilon": plan.final_budgets[chosen], "run": FINAL,
                 "ledger_sha256": _sha256(path)}
    clients = []
    for (client, phase), steps in sorted(entries.items()):
        spent = composed_epsilon(steps, family, plan.delta)
        if spent > config.privacy.epsilon + 1e-9:  # never silently over budget
            raise RuntimeError(f"client {client} composed epsilon {spent:.4f} over the candidates exceeds the budget "
                               f"{config.privacy.epsilon:g}")
        clients.append({"client": client, "phase": phase, "candidates": counts.get((client, phase), 0),
                        "final": (client, phase) in in_final, "epsilon": spent})
    not_covered = ([CONSENTING] if plan.validation == "consenting" else []) + ([EXACT_VIEW] if private else [])
    validation_ledger = None
    if plan.validation == "private":
        val = plan.candidates[0].federation.parts[VALIDATION_PART]
        accounts = []
        for actor in val.actor_list():
            account = DistributedAccount(actor, VALIDATION, int((val.actor_ids == actor).sum()))
            account.rounds_trained = len(plan.candidates)
            accounts.append(account)
        validation_ledger = build_distributed_ledger(
            accounts, {VALIDATION: plan.validation_plan},
            noise_source="run_seed" if config.privacy.noise_source == "run_seed" else "run_key",
            max_rounds={VALIDATION: len(plan.candidates)}, unit=config.privacy.unit,
            persons=len(accounts) if config.privacy.unit == "person" else None,
            security=config.aggregation.resolved_security)
        for entry in validation_ledger.clients:
            if entry.epsilon > config.privacy.epsilon + 1e-9:
                raise RuntimeError(f"validation client {entry.client} spends {entry.epsilon:.4f} > "
                                   f"{config.privacy.epsilon:g}")
    document = {
        "schema": TUNING_SCHEMA, "private": private,
        "mechanism_id": config.mechanism_id if private else None, "unit": config.privacy.unit,
        "noise": family.name if private else None, "accountant": family.accountant if private else None,
        "target_epsilon": config.privacy.epsilon if private else None, "delta": plan.delta,
        "space": plan.space, "candidates_declared": len(space_candidates(plan.space)), "pilot_share": plan.pilot_share,
        "selection": SELECTION,
        "validation": plan.validation, "score": SCORES[(plan.validation, config.privacy.unit)],
        "validation_ledger": VALIDATION_LEDGER if validation_ledger is not None else None,
        "validation_ledger_sha256": "0" * 64 if validation_ledger is not None else None,  # set once it is written
        "not_covered": not_covered, "chosen": chosen, "candidates": records, "final": final,
        "epsilon_max": max((c["epsilon"] for c in clients), default=None), "clients": clients,
    }
    return parse_tuning_ledger(document, run_dir / TUNING_LEDGER_FILE), validation_ledger


def read_tune_result(run_dir: Path) -> TuneResult:
    path = Path(run_dir) / RESULT
    try:
        return TuneResult(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise RunDirectoryError(f"{path} cannot be read ({exc.__class__.__name__}); delete it to rerun") from None


__all__ = ["default_space", "TUNABLE", "Candidate", "TuneResult", "TuningPlan", "candidate_budget",
           "composed_epsilon", "parse_space", "plan_tuning", "plan_validation", "release_score", "space_candidates",
           "tune", "tuning_ledgers"]
