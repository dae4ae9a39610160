"""privfer's secure aggregation inside Flower apps (``pip install "privfer[flower]"``).

A Flower app adopts it by changing two lines::

    # client_app.py
    from privfer.integrations.flower import secagg_mod
    app = ClientApp(mods=[secagg_mod])

    # server_app.py
    from privfer.integrations.flower import SecAggGrid
    result = strategy.start(grid=SecAggGrid(grid), initial_arrays=arrays, num_rounds=3)

:class:`SecAggGrid` wraps the ``Grid`` a ``ServerApp`` receives. When the
strategy sends ``train`` (and ``evaluate``) messages, the wrapper runs the four
stages of privfer's protocol (protocols/secagg/SPEC.md) as four Flower message
exchanges, privfer's typed, versioned messages travelling as bytes in a
``ConfigRecord`` named ``"privfer.secagg"``. The nodes train in the third stage;
:func:`secagg_mod` masks what the ``ClientApp`` returns — the model delta, the
example count and the configured metrics, each scaled by the node's weight — so
the server learns only the weighted sums. The strategy receives ONE reply: the
weighted average of the nodes' arrays and metrics, with the total example count
as the weight, plus an error reply per node that dropped out (FedAvg and its
relatives aggregate that as they would aggregate the nodes' replies).

Unlike Flower's own SecAgg+ (``secaggplus_mod``), masks come from AES-256-CTR
keyed with the full 32-byte X25519 secret, shares travel under AES-GCM bound to
round, sender and receiver, example counts and metrics are masked too, the
clients refuse unmask requests that name a node as both dropped and surviving,
and the mod refuses to answer a ``train`` message that does not come with
secure aggregation (a misconfigured server cannot collect plaintext updates).

:class:`LocalGrid` runs a ``ClientApp`` for several nodes in this process —
each with a persistent ``Context`` that is serialized between messages like a
SuperNode's — for tests, benchmarks and notebooks.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from privfer.secagg import messages as wire
from privfer.secagg.client import SecAggClient
from privfer.secagg.config import SecAggConfig
from privfer.secagg.errors import (
    MalformedMessage,
    MessageError,
    RoundAborted,
    SecAggError,
    WrongRound,
    WrongStage,
)
from privfer.secagg.payload import PayloadLayout, ShapeMismatch
from privfer.secagg.server import SecAggServer

try:
    from flwr.common import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Error,
        Message,
        MetricRecord,
        RecordDict,
    )
    from flwr.server import Grid
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        'privfer.integrations.flower needs Flower: pip install "privfer[flower]" (flwr>=1.20,<1.42)'
    ) from exc

log = logging.getLogger("privfer.flower")

RECORD = "privfer.secagg"  # the ConfigRecord that carries privfer's protocol messages
STATE = "privfer.secagg.state"  # the node's protocol state, in Context.state (never sent)
DEFAULTS: dict[str, Any] = {"modulus_bits": 64, "clipping_range": 8.0, "max_examples": 1 << 16}


class UnprotectedMessage(SecAggError):
    """A message that must travel under secure aggregation arrived without it."""


# --------------------------------------------------------------------------------------------------------------------
# The agreed layout of what a node returns: which arrays (record key, name, shape, dtype), in which order.
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArraySlot:
    record: str
    name: str
    shape: tuple[int, ...]
    dtype: str


def slots_of(content: RecordDict) -> list[ArraySlot]:
    return [
        ArraySlot(record_key, name, tuple(int(d) for d in array.shape), str(array.dtype))
        for record_key, record in content.array_records.items()
        for name, array in record.items()
    ]


def _slots_to_json(slots: Sequence[ArraySlot]) -> str:
    return json.dumps([[s.record, s.name, list(s.shape), s.dtype] for s in slots])


def _slots_from_json(text: str) -> list[ArraySlot]:
    return [ArraySlot(str(r), str(n), tuple(int(d) for d in shape), str(dt)) for r, n, shape, dt in json.loads(text)]


def _arrays_in(content: RecordDict, slots: Sequence[ArraySlot], what: str, exact: bool = True) -> list[np.ndarray]:
    """The arrays named by ``slots`` (as float64); ``exact``: and no others."""
    present = {(s.record, s.name): s.shape for s in slots_of(content)}
    expected = {(s.record, s.name): s.shape for s in slots}
    if (present if exact else {k: v for k, v in present.items() if k in expected}) != expected:
        raise ShapeMismatch(
            f"{what} holds arrays {sorted(present.items())[:6]}, but the round agreed on {sorted(expected.items())[:6]}"
        )
    return [np.asarray(content[s.record][s.name].numpy(), dtype=np.float64) for s in slots]


def _metrics_in(content: RecordDict) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for record in content.metric_records.values():
        merged.update(record)
    return merged


# --------------------------------------------------------------------------------------------------------------------
# Client side: the mod
# --------------------------------------------------------------------------------------------------------------------
def base_type(message_type: str) -> str:
    """Flower routes ``train.anything`` to the ``train`` function: protection goes by the part before the dot."""
    return message_type.split(".", 1)[0]


def make_secagg_mod(
    require: Iterable[str] = ("train", "evaluate"), min_clients: int = 3, state_ttl: float = 6 * 3600.0
) -> Callable[[Message, Context, Callable], Message]:
    """A Flower mod that answers privfer's secure-aggregation stages.

    ``require``: message types this ``ClientApp`` answers only under secure
    aggregation; such a message without privfer's record raises
    :class:`UnprotectedMessage` (the server gets an error reply, never the
    update). Other message types pass through untouched.

    ``min_clients``: the node takes part only in rounds with at least this
    many nodes — in the config, in the key roster, and among the survivors it
    is asked to unmask for (with 2, one colluding peer and the server learn the
    other's update from the sum).

    ``state_ttl``: seconds after which a round's keys left in the node's
    ``Context`` (a round the server abandoned) are deleted, at the node's next
    message.
    """
    required = frozenset(base_type(kind) for kind in require)
    if min_clients < 2:
        raise ValueError(f"min_clients must be at least 2, got {min_clients}")
    if not state_ttl > 0:
        raise ValueError(f"state_ttl must be positive, got {state_ttl}")

    def secagg_mod(msg: Message, ctxt: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        kind = msg.metadata.message_type
        content = msg.content
        _expire(ctxt, state_ttl)
        if RECORD not in content.config_records:
            if base_type(kind) in required:
                raise UnprotectedMessage(
                    f"this ClientApp answers {kind!r} messages only under privfer secure aggregation; "
                    "wrap the server's Grid in privfer.integrations.flower.SecAggGrid"
                )
            return call_next(msg, ctxt)
        record = content.config_records[RECORD]
        stage = record.get("stage")
        try:
            if stage == "advertise_keys":
                reply = _advertise(record, ctxt, min_clients)
            elif stage == "share_keys":
                reply = _share_keys(record, ctxt, min_clients)
            elif stage == "masked_input":
                del content[RECORD]  # the ClientApp sees the strategy's message as it was sent
                answer = _masked_input(record, msg, ctxt, call_next)
                if isinstance(answer, Message):
                    return answer  # the ClientApp's own error reply
                reply = answer
            elif stage == "unmask":
                reply = _unmask(record, ctxt, min_clients)
                _forget(ctxt)
            else:
                raise WrongStage(f"unknown privfer secure-aggregation stage {stage!r}")
        except Exception:
            _forget(ctxt)  # a failed stage ends this node's part in the round; keep no keys
            raise
        out = RecordDict({RECORD: ConfigRecord({"stage": str(stage), "message": reply})})
        return Message(out, reply_to=msg)

    return secagg_mod


secagg_mod = make_secagg_mod()


def _field(record: ConfigRecord, name: str, kind: type) -> Any:
    value = record.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise MalformedMessage(f"privfer record field {name!r} is missing or not {kind.__name__}")
    return value


def _save(ctxt: Context, client: SecAggClient, slots: str, weight_key: str, created: float | None = None) -> None:
    ctxt.state.config_records[STATE] = ConfigRecord({"client": client.export_state(), "slots": slots,
                                                     "weight_key": weight_key,
                                                     "created": time.time() if created is None else created})


def _resave(ctxt: Context, client: SecAggClient, saved: ConfigRecord) -> None:
    """Save the client after a stage, with the round's layout, weight key and start time unchanged."""
    _save(ctxt, client, saved["slots"], saved["weight_key"], saved["created"])


def _at_least(count: int, min_clients: int, what: str) -> None:
    if count < min_clients:
        raise RoundAborted(f"{what} {count} nodes; this node takes part only in sums of at least {min_clients} "
                           "(make_secagg_mod(min_clients=...))")


def _expire(ctxt: Context, ttl: float) -> None:
    saved = ctxt.state.config_records.get(STATE)
    if saved is not None and not time.time() - float(saved.get("created", 0.0)) <= ttl:
        log.info("deleting the keys of an abandoned secure-aggregation round")
        _forget(ctxt)


def _load(ctxt: Context, record: ConfigRecord) -> tuple[SecAggClient, ConfigRecord]:
    saved = ctxt.state.config_records.get(STATE)
    if saved is None:
        raise WrongStage("this node holds no secure-aggregation round (it missed the first stage, or the round ended)")
    client = SecAggClient.restore(saved["client"])
    round_id = _field(record, "round", str)
    if client.round_id != round_id:
        raise WrongRound(f"a stage of round {round_id!r} arrived; this node is in round {client.round_id!r}")
    return client, saved


def _forget(ctxt: Context) -> None:
    if STATE in ctxt.state.config_records:
        del ctxt.state[STATE]


def _expect(raw: bytes, kind: type[wire.Message]) -> Any:
    message = wire.decode(raw)
    if not isinstance(message, kind):
        raise WrongStage(f"expected {kind.__name__}, got {type(message).__name__}")
    return message


def _advertise(record: ConfigRecord, ctxt: Context, min_clients: int) -> bytes:
    _forget(ctxt)  # a new round replaces whatever an unfinished one left
    try:
        config = SecAggConfig.model_validate_json(_field(record, "config", str))
        slots_json = _field(record, "slots", str)
        slots = _slots_from_json(slots_json)
    except MalformedMessage:
        raise
    except Exception as exc:  # pydantic, JSON or shape errors in what the server sent
        raise MalformedMessage(f"privfer record field 'config' or 'slots' is invalid ({type(exc).__name__})") from None
    _at_least(config.num_clients, min_clients, "the round is configured for")
    layout = PayloadLayout(tuple(s.shape for s in slots), config)
    client = SecAggClient(_field(record, "client_id", int), config, _field(record, "round", str), layout)
    advert = client.advertise_keys().to_bytes()
    _save(ctxt, client, slots_json, _field(record, "weight_key", str))
    return advert


def _share_keys(record: ConfigRecord, ctxt: Context, min_clients: int) -> bytes:
    client, saved = _load(ctxt, record)
    roster = _expect(_field(record, "message", bytes), wire.KeyRoster)
    _at_least(len(roster.keys), min_clients, "the key roster lists")
    answer = client.share_keys(roster).to_bytes()
    _resave(ctxt, client, saved)
    return answer


def _masked_input(record: ConfigRecord, msg: Message, ctxt: Context, call_next: Callable) -> bytes | Message:
    client, saved = _load(ctxt, record)
    forwarded = _expect(_field(record, "message", bytes), wire.ForwardedShares)
    client.check_forwarded(forwarded)  # before training: a replayed or misrouted stage spends no privacy budget
    slots = _slots_from_json(saved["slots"])
    weight_key = saved["weight_key"]
    received = _arrays_in(msg.content, slots, "the server's message", exact=False)
    reply = call_next(msg, ctxt)
    if reply.has_error():
        _forget(ctxt)
        return reply
    local = _arrays_in(reply.content, slots, "the ClientApp's reply")
    metrics = _metrics_in(reply.content)
    if weight_key not in metrics:
        raise ValueError(f"the ClientApp's reply has no {weight_key!r} metric; privfer sums it as the FedAvg weight")
    count = metrics.pop(weight_key)
    if (isinstance(count, bool) or not isinstance(count, (int, float)) or not math.isfinite(count)
            or count != int(count) or count < 0):
        raise ValueError(f"the reply's {weight_key!r} must be a whole number of examples, 0 or more")
    config = client.config
    # Capped, never refused: an error reply for a count above a limit the server chooses would tell it one bit of
    # the count per round.
    if count > config.max_examples:
        log.warning("this node's %r exceeds max_examples=%d and counts as %d", weight_key, config.max_examples,
                    config.max_examples)
    count = min(int(count), config.max_examples)
    missing = [name for name in config.metrics if name not in metrics]
    if missing:
        raise ValueError(f"the ClientApp's reply lacks the securely averaged metrics {missing}")
    extra = sorted(set(metrics) - set(config.metrics))
    if extra:
        log.warning("metrics %s are not among the securely averaged ones and are not sent", extra)
    scale = count / config.max_examples  # weight in [0, 1]: the sums stay inside the clipping ranges
    values = {}
    for name in config.metrics:
        value = metrics[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"metric {name!r} must be a number to be averaged securely, got {type(value).__name__}")
        values[name] = float(value) * scale
    update = [(after - before) * scale for after, before in zip(local, received)]
    answer = client.masked_input(forwarded, update, example_count=count, metrics=values).to_bytes()
    if client.clipping.clipped:
        log.warning("%d of %d values exceeded privfer's clipping range and were clipped", client.clipping.clipped,
                    client.clipping.total)
    _resave(ctxt, client, saved)
    return answer


def _unmask(record: ConfigRecord, ctxt: Context, min_clients: int) -> bytes:
    client, _ = _load(ctxt, record)
    request = _expect(_field(record, "message", bytes), wire.UnmaskRequest)
    _at_least(len(request.survivors), min_clients, "the unmask request lists as survivors")
    return client.unmask(request).to_bytes()


# --------------------------------------------------------------------------------------------------------------------
# Server side: the Grid wrapper
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class RoundReport:
    """What one securely aggregated exchange did (one per protected ``send_and_receive``)."""

    message_type: str
    group_id: str
    round_id: str
    sampled: list[int]
    included: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)  # node id -> "stage: reason"
    example_count: int = 0
    clipped: int = 0
    aborted: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    privfer_bytes: int = 0  # privfer's protocol messages both ways (Flower's envelopes not counted)


class SecAggGrid(Grid):
    """A ``Grid`` whose ``train``/``evaluate`` exchanges run privfer's secure aggregation.

    Args:
        grid: the ``Grid`` the ``ServerApp`` received.
        protect: message types aggregated securely (others pass through).
        with_arrays: protected message types whose replies carry the model's
            arrays (averaged); the others' replies carry metrics only.
        weighted_by_key: the metric holding each node's example count (FedAvg's key).
        train_metrics, evaluate_metrics: metric names averaged securely (weighted
            by the count); other metrics in the nodes' replies are never sent.
        stage_timeout: seconds to wait for each stage's replies (default: the
            strategy's timeout).
        **secagg: :class:`~privfer.secagg.SecAggConfig` fields other than
            ``num_clients`` (set to the number of sampled nodes each round) and
            ``metrics``. Defaults here: ``modulus_bits=64``,
            ``clipping_range=8.0`` (bounds each node's weighted delta),
            ``max_examples=65536``.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        protect: Iterable[str] = ("train", "evaluate"),
        with_arrays: Iterable[str] = ("train",),
        weighted_by_key: str = "num-examples",
        train_metrics: Sequence[str] = (),
        evaluate_metrics: Sequence[str] = (),
        stage_timeout: float | None = None,
        **secagg: Any,
    ) -> None:
        unknown = set(secagg) - set(SecAggConfig.model_fields)
        if unknown:
            raise TypeError(f"unknown SecAggConfig fields {sorted(unknown)}")
        fixed = {"num_clients", "metrics", "backend"} & set(secagg)
        if fixed:
            raise TypeError(f"{sorted(fixed)} are set by SecAggGrid (sampled nodes, *_metrics), not passed")
        if weighted_by_key in (*train_metrics, *evaluate_metrics):
            raise ValueError(f"{weighted_by_key!r} is the weight; it cannot also be an averaged metric")
        self.grid = grid
        self.protect = frozenset(base_type(kind) for kind in protect)
        self.with_arrays = frozenset(base_type(kind) for kind in with_arrays)
        self.weighted_by_key = weighted_by_key
        self.metrics = {"train": tuple(train_metrics), "evaluate": tuple(evaluate_metrics)}
        self.stage_timeout = stage_timeout
        self.secagg = {**DEFAULTS, **secagg}
        SecAggConfig(num_clients=2, **self.secagg)  # field errors now, not in round 1
        self.reports: list[RoundReport] = []

    # -- Grid: delegated ---------------------------------------------------------------------------------------------
    @property
    def run(self):  # type: ignore[override]
        return self.grid.run

    def set_run(self, *args: Any, **kwargs: Any) -> None:
        self.grid.set_run(*args, **kwargs)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        protected = {base_type(m.metadata.message_type) for m in messages} & self.protect
        if protected:
            raise TypeError(
                f"{sorted(protected)} messages go through send_and_receive, where privfer runs its four stages; "
                "pushing them directly would bypass secure aggregation"
            )
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        kinds = {m.metadata.message_type for m in messages}
        if not messages or not {base_type(k) for k in kinds} & self.protect:
            return self.grid.send_and_receive(messages, timeout=timeout)
        if len(kinds) > 1:
            raise ValueError(f"one securely aggregated exchange carries one message type, got {sorted(kinds)}")
        return _SecureRound(self, messages, self.stage_timeout or timeout).run()


class _SecureRound:
    """One protected exchange: four Flower round trips, one aggregated reply."""

    def __init__(self, grid: SecAggGrid, messages: list[Message], timeout: float | None) -> None:
        self.grid, self.timeout = grid, timeout
        self.kind = messages[0].metadata.message_type
        self.group_id = messages[0].metadata.group_id
        self.originals = {m.metadata.dst_node_id: m for m in messages}
        if len(self.originals) != len(messages):
            raise ValueError("two messages of one exchange go to the same node")
        if len(self.originals) < 2:
            raise ValueError(
                f"secure aggregation needs at least 2 nodes; the strategy sampled {len(self.originals)} "
                "(a 'sum' of one node is its update)"
            )
        self.nodes = sorted(self.originals)
        self.ids = {node: index + 1 for index, node in enumerate(self.nodes)}
        first = messages[0].content
        self.slots = slots_of(first) if base_type(self.kind) in grid.with_arrays else []
        for message in messages[1:]:
            if not _same_arrays(first, message.content):
                raise ValueError("every sampled node must receive the same arrays: privfer averages deltas from them")
        self.received = _arrays_in(first, self.slots, "the strategy's message", exact=False)
        names = grid.metrics.get(base_type(self.kind), ())
        self.config = SecAggConfig(num_clients=len(self.nodes), metrics=tuple(names), **grid.secagg)
        self.layout = PayloadLayout(tuple(s.shape for s in self.slots), self.config)
        self.round_id = "/".join(filter(None, (self.kind, self.group_id, secrets.token_hex(8))))
        self.server = SecAggServer(self.config, self.round_id, self.layout)
        self.report = RoundReport(self.kind, self.group_id, self.round_id, list(self.nodes))
        self.alive = list(self.nodes)

    # -- one stage ------------------------------------------------------------------------------------------------------
    def exchange(self, stage: str, payloads: Mapping[int, bytes], extra: Callable[[int], dict] | None = None,
                 with_content: bool = False) -> dict[int, bytes]:
        outgoing: dict[int, Message] = {}
        for node, payload in payloads.items():
            fields = {"stage": stage, "round": self.round_id, "message": payload, **(extra(node) if extra else {})}
            content = RecordDict(dict(self.originals[node].content)) if with_content else RecordDict()
            content[RECORD] = ConfigRecord(fields)
            # a stage message expires with the stage: a late one cannot reach a node in a later round
            outgoing[node] = Message(content, dst_node_id=node, message_type=self.kind, group_id=self.group_id,
                                     ttl=self.timeout)
        replies = self.grid.grid.send_and_receive(list(outgoing.values()), timeout=self.timeout)
        by_message = {m.metadata.message_id: node for node, m in outgoing.items() if m.metadata.message_id}
        answers: dict[int, bytes] = {}
        for reply in replies:
            node = by_message.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            if node not in outgoing or node in answers or node in self.report.dropped:
                continue
            if reply.has_error():
                self.drop(node, stage, f"error reply: {reply.error.reason}")
                continue
            record = reply.content.config_records.get(RECORD)
            message = None if record is None else record.get("message")
            if record is None or record.get("stage") != stage or not isinstance(message, bytes):
                self.drop(node, stage, "reply without privfer's record for this stage")
                continue
            answers[node] = message
        for node in outgoing:
            if node not in answers and node not in self.report.dropped:
                self.drop(node, stage, "no reply before the timeout")
        return answers

    def drop(self, node: int, stage: str, reason: str) -> None:
        self.report.dropped[node] = f"{stage}: {reason}"
        if node in self.alive:
            self.alive.remove(node)
        log.info("node %d dropped out of secure aggregation at %s (%s)", node, stage, reason)

    def accept(self, stage: str, answers: Mapping[int, bytes], receive: Callable[[bytes, int], None]) -> None:
        for node, raw in answers.items():
            try:
                receive(raw, self.ids[node])
            except MessageError as exc:
                self.drop(node, stage, f"{type(exc).__name__}: {exc}")

    # -- the round --------------------------------------------------------------------------------------------------
    def run(self) -> list[Message]:
        server, ids = self.server, self.ids
        started = time.perf_counter()
        try:
            config_json = self.config.model_dump_json()
            slots_json = _slots_to_json(self.slots)
            answers = self.exchange("advertise_keys", {node: b"" for node in self.alive}, lambda node: {
                "client_id": ids[node], "config": config_json, "slots": slots_json,
                "weight_key": self.grid.weighted_by_key})
            self.accept("advertise_keys", answers, lambda raw, cid: server.receive_advertise(raw, peer=cid))
            self.lap("advertise_keys", started)

            roster = server.key_roster().to_bytes()
            answers = self.exchange("share_keys", {node: roster for node in self.alive})
            self.accept("share_keys", answers, lambda raw, cid: server.receive_share_keys(raw, peer=cid))
            self.lap("share_keys", started)

            bundles = server.forward_shares()
            payloads = {node: bundles[ids[node]].to_bytes() for node in self.alive if ids[node] in bundles}
            answers = self.exchange("masked_input", payloads, with_content=True)
            self.accept("masked_input", answers, lambda raw, cid: server.receive_masked_input(raw, peer=cid))
            self.lap("masked_input", started)

            request = server.unmask_request().to_bytes()
            answers = self.exchange("unmask", {node: request for node in self.alive})
            self.accept("unmask", answers, lambda raw, cid: server.receive_unmask(raw, peer=cid))
            summed = server.finish()
            self.lap("unmask", started)
        except RoundAborted as exc:
            self.report.aborted = str(exc)
            log.warning("secure aggregation of %s round %s aborted: %s", self.kind, self.group_id, exc)
            self.finish_report()
            return self.error_replies(self.nodes, f"privfer secure aggregation aborted: {exc}")
        self.report.included = [self.nodes[cid - 1] for cid in summed.included]
        self.report.example_count = summed.decoded.example_count
        self.report.clipped = summed.decoded.clipped
        self.finish_report()
        if summed.decoded.clipped:
            log.warning("%d values of the included nodes were clipped to privfer's clipping range (%g)",
                        summed.decoded.clipped, self.config.clipping_range)
        # a node lost at unmask is in the sum (its self mask recovered): no error reply for it
        replies = self.error_replies(sorted(set(self.report.dropped) - set(self.report.included)), None)
        if summed.decoded.example_count <= 0:
            log.warning("the included nodes reported 0 examples in total; there is nothing to average")
            return replies
        return [self.aggregated_reply(summed.decoded), *replies]

    def lap(self, stage: str, started: float) -> None:
        self.report.seconds[stage] = time.perf_counter() - started - sum(self.report.seconds.values())

    def finish_report(self) -> None:
        transcript = self.server.transcript
        self.report.privfer_bytes = transcript.bytes_in() + transcript.bytes_out()
        self.grid.reports.append(self.report)

    def aggregated_reply(self, decoded: Any) -> Message:
        total = decoded.example_count
        factor = self.config.max_examples / total
        content = RecordDict()
        for slot, before, summed in zip(self.slots, self.received, decoded.arrays):
            value = before + summed * factor
            value = (np.rint(value) if np.dtype(slot.dtype).kind in "iub" else value).astype(slot.dtype)
            if slot.record not in content.array_records:
                content[slot.record] = ArrayRecord()
            content[slot.record][slot.name] = Array(np.ascontiguousarray(value))
        metrics: dict[str, int | float] = {self.grid.weighted_by_key: int(total)}
        metrics.update({name: float(value) * factor for name, value in decoded.metrics.items()})
        content["metrics"] = MetricRecord(metrics)
        return Message(content, reply_to=self.originals[self.report.included[0]])

    def error_replies(self, nodes: Iterable[int], reason: str | None) -> list[Message]:
        return [Message(Error(code=0, reason=reason or f"privfer secure aggregation: dropped at {self.report.dropped[n]}"),
                        reply_to=self.originals[n]) for n in nodes]


def _same_arrays(a: RecordDict, b: RecordDict) -> bool:
    if a is b:
        return True
    if slots_of(a) != slots_of(b):
        return False
    return all(a[r][n].data == b[r][n].data for r, record in a.array_records.items() for n in record)


# --------------------------------------------------------------------------------------------------------------------
# LocalGrid: Flower nodes in this process
# --------------------------------------------------------------------------------------------------------------------
class LocalGrid(Grid):
    """A ``Grid`` that runs ``client_app`` for each node in this process.

    Each node keeps a ``Context`` that is serialized to Flower's protobuf
    between messages (as a SuperNode holds it), and every message and reply
    goes through protobuf too, so ``bytes_sent``/``bytes_received`` are what
    the wire would carry. ``answers`` maps a node id to the number of messages
    it answers before it vanishes (a dropout: its later messages get no
    reply). An exception in the ``ClientApp`` becomes an error reply, as on a
    SuperNode.
    """

    def __init__(
        self,
        client_app: Any,
        num_nodes: int,
        *,
        run_config: Mapping[str, Any] | None = None,
        node_config: Callable[[int], Mapping[str, Any]] | None = None,
        answers: Mapping[int, int] | None = None,
        run_id: int = 1,
    ) -> None:
        from flwr.common.serde import context_to_proto

        _ensure_task_identity(run_id)
        self.client_app = client_app
        self.node_ids = [1000 + index for index in range(num_nodes)]
        self.answers = dict(answers or {})
        self._run_id = run_id
        self._contexts = {
            node: context_to_proto(Context(run_id=run_id, node_id=node,
                                           node_config=dict(node_config(index) if node_config else {}),
                                           state=RecordDict(), run_config=dict(run_config or {}))).SerializeToString()
            for index, node in enumerate(self.node_ids)
        }
        self._replies: dict[str, Message] = {}
        self.handled: dict[int, int] = {node: 0 for node in self.node_ids}
        self.bytes_sent = 0  # server -> nodes
        self.bytes_received = 0  # nodes -> server
        self.client_seconds = 0.0

    @property
    def run(self):  # type: ignore[override]
        try:
            from flwr.supercore.run import Run
        except ImportError:  # flwr < 1.41
            from flwr.common.typing import Run  # type: ignore[attr-defined,no-redef]
        return Run.create_empty(self._run_id)

    def set_run(self, run: Any) -> None:
        self._run_id = int(getattr(run, "run_id", run))

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
        from flwr.proto.message_pb2 import Context as ContextProto

        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node not in self._contexts:
                raise ValueError(f"no node {node} in this LocalGrid")
            message_id = uuid.uuid4().hex
            message.metadata.__dict__["_message_id"] = message_id  # as Flower's grids do on push
            proto = message_to_proto(message)
            proto.metadata.message_id = message_id
            self.bytes_sent += proto.ByteSize()
            ids.append(message_id)
            self.handled[node] += 1
            if node in self.answers and self.handled[node] > self.answers[node]:
                continue  # gone: no reply will ever come
            delivered = message_from_proto(proto)
            context = context_from_proto(ContextProto.FromString(self._contexts[node]))
            started = time.perf_counter()
            try:
                reply = self.client_app(delivered, context)
            except Exception as exc:  # noqa: BLE001 - a SuperNode turns any ClientApp failure into an error reply
                reply = Message(Error(code=2, reason=f"{type(exc).__name__}: {exc}"), reply_to=delivered)
            self.client_seconds += time.perf_counter() - started
            self._contexts[node] = context_to_proto(context).SerializeToString()
            reply_proto = message_to_proto(reply)
            reply_proto.metadata.message_id = uuid.uuid4().hex
            self.bytes_received += reply_proto.ByteSize()
            self._replies[message_id] = message_from_proto(reply_proto)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def context(self, node: int) -> Context:
        """The node's current ``Context`` (a copy)."""
        from flwr.common.serde import context_from_proto
        from flwr.proto.message_pb2 import Context as ContextProto

        return context_from_proto(ContextProto.FromString(self._contexts[node]))


def _ensure_task_identity(run_id: int) -> None:
    """Flower >= 1.41 builds instruction messages from the process's task identity, which a ServerApp process has."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # older Flower: messages need no task identity
        return
    try:
        TaskIdentity.run_id
    except RuntimeError:
        from flwr.common.constant import SUPERLINK_NODE_ID

        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 0


__all__ = ["LocalGrid", "RECORD", "RoundReport", "STATE", "SecAggGrid", "UnprotectedMessage", "make_secagg_mod",
           "secagg_mod"]
