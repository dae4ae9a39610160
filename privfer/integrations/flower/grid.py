"""Server side: SecAggGrid, the Grid wrapper that runs each protected exchange as a secure round."""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from privfer.integrations.flower.common import (
    COUNT_RECORD,
    DEFAULTS,
    PLAN_FIELD,
    RECORD,
    ConfigRecord,
    Error,
    Grid,
    Message,
    RecordDict,
    log,
)
from privfer.integrations.flower.mod import base_type
from privfer.integrations.flower.replies import RoundReport, aggregated_reply, decoded_records, private_reply
from privfer.privacy.node import plan_to_json
from privfer.integrations.flower.slots import (ArraySlot, _arrays_in, _slots_to_json, content_bytes, round_context,
                                               slots_of)
from privfer.secagg import messages as wire
from privfer.secagg.config import SecAggConfig
from privfer.secagg.errors import MessageError, RoundAborted, SecAggError
from privfer.secagg.identity import RosterCertificate, verify_signature
from privfer.secagg.statements import advertise_statement
from privfer.secagg.payload import PayloadLayout
from privfer.secagg.server import SecAggServer
from privfer.secagg.stages import round_stages


COUNT_SLOT = ArraySlot(COUNT_RECORD, "records", (1,), "int64")  # record-level DP: each node's record count


# --------------------------------------------------------------------------------------------------------------------
# Server side: the Grid wrapper
# --------------------------------------------------------------------------------------------------------------------
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
        security: "active" (the default): the nodes are members of
            ``certificate`` (signed by an enrollment authority that is not this
            server), their key advertisements are signed, and a fifth exchange
            — the consistency check — has every survivor sign its view of the
            round (survivors, roster, the arrays it received and the DP plan)
            before any node reveals a share: a node given another model than
            its peers makes the round abort. "semi_honest": the server is
            trusted to follow the protocol (labelled in every report).
        certificate: the study's :class:`~privfer.secagg.identity.RosterCertificate`
            (active security; the nodes check it against their own pinned
            authority key, the server uses it to refuse unenrolled nodes early).
        dp: :class:`~privfer.privacy.node.DistributedDP`: every
            protected exchange with arrays (``train``) runs person-level
            distributed DP — the nodes send clipped updates (or zeros, by
            their secret coins) with their own noise shares as integers, the
            server divides the sum by ``participation x included`` and the
            strategy receives the received arrays plus that mean, weighted by
            the number of included nodes. No metric is averaged then.
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
        dp: Any = None,
        security: str = "active",
        certificate: RosterCertificate | None = None,
        **secagg: Any,
    ) -> None:
        unknown = set(secagg) - set(SecAggConfig.model_fields)
        if unknown:
            raise TypeError(f"unknown SecAggConfig fields {sorted(unknown)}")
        if security not in ("active", "semi_honest"):
            raise ValueError(f"security must be 'active' or 'semi_honest', got {security!r}")
        if security == "active" and not isinstance(certificate, RosterCertificate):
            raise ValueError("SecAggGrid runs active security by default: pass certificate=RosterCertificate.load(...) "
                             "(the study's roster, privfer enroll), or security='semi_honest' to trust the server "
                             "to follow the protocol")
        self.security, self.certificate = security, certificate
        fixed = {"num_clients", "metrics", "backend", "security"} & set(secagg)
        if fixed:
            raise TypeError(f"{sorted(fixed)} are set by SecAggGrid (sampled nodes, *_metrics), not passed")
        if weighted_by_key in (*train_metrics, *evaluate_metrics):
            raise ValueError(f"{weighted_by_key!r} is the weight; it cannot also be an averaged metric")
        if dp is not None and train_metrics:
            raise ValueError("under distributed DP a train reply carries no metric (a loss is not DP-protected): "
                             "pass train_metrics=()")
        self.dp = dp
        self.grid = grid
        self.protect = frozenset(base_type(kind) for kind in protect)
        self.with_arrays = frozenset(base_type(kind) for kind in with_arrays)
        self.weighted_by_key = weighted_by_key
        self.metrics = {"train": tuple(train_metrics), "evaluate": tuple(evaluate_metrics)}
        self.stage_timeout = stage_timeout
        self.secagg = {**DEFAULTS, **secagg, "security": security}
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
        # client ids: the server numbers the nodes (semi-honest); under active security each node's member id,
        # learned from its signed advertisement
        self.ids = {node: index + 1 for index, node in enumerate(self.nodes)}
        self.node_of = {cid: node for node, cid in self.ids.items()}
        first = messages[0].content
        self.slots = slots_of(first) if base_type(self.kind) in grid.with_arrays else []
        for message in messages[1:]:
            if not _same_arrays(first, message.content):
                raise ValueError("every sampled node must receive the same arrays: privfer averages deltas from them")
        self.received = _arrays_in(first, self.slots, "the strategy's message", exact=False)
        names = grid.metrics.get(base_type(self.kind), ())
        self.plan = None
        if grid.dp is not None and self.slots:  # person-level distributed DP: integers, the plan's bounds
            dimension = sum(int(np.prod(s.shape, dtype=np.int64)) for s in self.slots)
            self.plan = grid.dp.plan(len(self.nodes), dimension)
            if grid.dp.unit == "record":  # each node adds its record count (public at record level), exact
                self.slots = [*self.slots, COUNT_SLOT]
            dp_fields = {"encoding": "integer", "integer_sum_bound": self.plan.sum_bound,
                         "min_inputs": self.plan.min_inputs, "modulus_bits": self.plan.modulus_bits}
            self.config = SecAggConfig(num_clients=len(self.nodes), **{**grid.secagg, **dp_fields})
        else:
            self.config = SecAggConfig(num_clients=len(self.nodes), metrics=tuple(names), **grid.secagg)
        self.layout = PayloadLayout(tuple(s.shape for s in self.slots), self.config)
        self.round_id = "/".join(filter(None, (self.kind, self.group_id, secrets.token_hex(8))))
        self.plan_json = "" if self.plan is None else plan_to_json(self.plan, grid.dp.unit)
        self.active = self.config.security == "active"
        context = None
        if self.active:  # every node signs the whole message it is given: they must all be given the same one
            if len({content_bytes(m.content) for m in messages}) != 1:
                raise ValueError("under active security every sampled node receives the same message (the nodes "
                                 "sign what they were given; differing messages would abort the round)")
            context = round_context(first, _slots_to_json(self.slots), grid.weighted_by_key, self.plan_json)
        self.server = SecAggServer(self.config, self.round_id, self.layout,
                                   certificate=grid.certificate if self.active else None, context=context)
        self.report = RoundReport(self.kind, self.group_id, self.round_id, list(self.nodes),
                                  security=self.config.security)
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

    def member_ids(self, answers: Mapping[int, bytes]) -> dict[int, bytes]:
        """Active security: each node's id is the member id its signed advertisement names. The signature is checked
        against the certificate BEFORE the id is assigned, so a node cannot squat another member's id with a bad
        signature and evict it; only a valid advertisement claims an id (a second valid one for the same id — the
        same member on two nodes — drops out). Every client checks every roster entry again."""
        certificate = self.grid.certificate
        assert certificate is not None
        claimed: dict[int, bytes] = {}
        owner: dict[int, int] = {}  # member id -> the node whose valid advertisement claimed it
        for node, raw in answers.items():
            try:
                advert = wire.AdvertiseKeys.from_bytes(raw)
                member = advert.sender
                verify_signature(certificate.public_key(member),
                                 advertise_statement(certificate.study, self.round_id, member, advert.c_public,
                                                     advert.s_public),
                                 advert.signature, f"node {node}'s key advertisement")
            except MessageError as exc:
                self.drop(node, "advertise_keys", f"{type(exc).__name__}: {exc}")
                continue
            if member in owner:
                self.drop(node, "advertise_keys", f"claims member id {member}, already claimed by node {owner[member]}")
                continue
            owner[member] = node
            self.ids[node] = member
            claimed[node] = raw
        self.node_of = {member: node for member, node in owner.items()}
        return claimed

    def addressed(self, messages: Mapping[int, Any]) -> dict[int, bytes]:
        """Each live node's own message (keyed by its client id), as bytes."""
        return {node: messages[self.ids[node]].to_bytes() for node in self.alive if self.ids[node] in messages}

    def broadcast(self, message: Any) -> dict[int, bytes]:
        """The same message's bytes for every live node."""
        raw = message.to_bytes()
        return {node: raw for node in self.alive}

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
            plan = {} if self.plan is None else {PLAN_FIELD: self.plan_json}
            stages = round_stages(self.config)
            for stage in stages:  # the stages the in-process recipe walks too
                opening = stage.opens(server)
                if opening.addressed is not None:
                    answers = self.exchange(stage.name, self.addressed(opening.addressed),
                                            with_content=stage.needs_model)
                elif opening.broadcast is not None:
                    answers = self.exchange(stage.name, self.broadcast(opening.broadcast),
                                            with_content=stage.needs_model)
                else:  # the first stage: the round's config and arrays start it on every node
                    answers = self.exchange(stage.name, {node: b"" for node in self.alive}, lambda node: {
                        "client_id": ids[node], "config": config_json, "slots": slots_json,
                        "weight_key": self.grid.weighted_by_key, **plan})
                    if self.active:
                        answers = self.member_ids(answers)
                self.accept(stage.name, answers, lambda raw, cid, receive=stage.receive: receive(server, raw, cid))
                if stage is not stages[-1]:
                    self.lap(stage.name, started)
            summed = server.finish()
            self.lap(stages[-1].name, started)
        except SecAggError as exc:  # aborted, or shares that fail their commitments (InconsistentShares)
            if not isinstance(exc, RoundAborted):
                blamed = [self.node_of[cid] for cid in getattr(exc, "senders", ()) if cid in self.node_of]
                log.warning("secure aggregation of %s round %s failed (%s); nodes at fault: %s", self.kind,
                            self.group_id, exc.__class__.__name__, blamed)
            self.report.aborted = str(exc)
            log.warning("secure aggregation of %s round %s aborted: %s", self.kind, self.group_id, exc)
            self.finish_report()
            return self.error_replies(self.nodes, f"privfer secure aggregation aborted: {exc}")
        self.report.included = [self.node_of[cid] for cid in summed.included]
        self.report.example_count = summed.decoded.example_count
        self.report.clipped = summed.decoded.clipped
        self.finish_report()
        if self.plan is not None:
            replies = self.error_replies(sorted(set(self.report.dropped) - set(self.report.included)), None)
            try:
                records = decoded_records(summed.decoded, self.grid.dp)
                if records is not None:  # reported even when the step below refuses it
                    self.report.example_count = records
                reply = private_reply(summed.decoded, self.slots, self.received, self.grid.dp, self.plan,
                                      len(self.report.included), records, self.grid.weighted_by_key)
                return [Message(reply, reply_to=self.originals[self.report.included[0]]), *replies]
            except (RoundAborted, ValueError) as exc:  # a sum beyond the plan's bound, or no records
                self.report.aborted = str(exc)
                log.warning("distributed DP round %s released no update: %s", self.group_id, exc)
                return self.error_replies(self.nodes, f"privfer distributed DP: {exc}")
        if summed.decoded.clipped:
            log.warning("%d values of the included nodes were clipped to privfer's clipping range (%g)",
                        summed.decoded.clipped, self.config.clipping_range)
        # a node lost at unmask is in the sum (its self mask recovered): no error reply for it
        replies = self.error_replies(sorted(set(self.report.dropped) - set(self.report.included)), None)
        if summed.decoded.example_count <= 0:
            log.warning("the included nodes reported 0 examples in total; there is nothing to average")
            return replies
        reply = aggregated_reply(summed.decoded, self.slots, self.received, self.config.max_examples,
                                 self.grid.weighted_by_key)
        return [Message(reply, reply_to=self.originals[self.report.included[0]]), *replies]

    def lap(self, stage: str, started: float) -> None:
        self.report.seconds[stage] = time.perf_counter() - started - sum(self.report.seconds.values())

    def finish_report(self) -> None:
        self.report.client_ids = {node: self.ids[node] for node in self.nodes if node not in self.report.dropped
                                  or self.report.dropped[node].split(":")[0] != "advertise_keys"}
        transcript = self.server.transcript
        self.report.privfer_bytes = transcript.bytes_in() + transcript.bytes_out()
        self.grid.reports.append(self.report)

    def error_replies(self, nodes: Iterable[int], reason: str | None) -> list[Message]:
        return [Message(Error(code=0, reason=reason or f"privfer secure aggregation: dropped at {self.report.dropped[n]}"),
                        reply_to=self.originals[n]) for n in nodes]


def _same_arrays(a: RecordDict, b: RecordDict) -> bool:
    if a is b:
        return True
    if slots_of(a) != slots_of(b):
        return False
    return all(a[r][n].data == b[r][n].data for r, record in a.array_records.items() for n in record)
