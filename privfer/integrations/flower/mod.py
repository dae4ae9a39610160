"""Client side: the Flower mod (secagg_mod, make_secagg_mod) that answers privfer's four stages."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Union

from privfer.integrations.flower.common import (
    COUNT_RECORD,
    PLAN_FIELD,
    RECORD,
    STATE,
    ConfigRecord,
    Context,
    Message,
    RecordDict,
    UnprotectedMessage,
    log,
)
from privfer.integrations.flower.membership import MembershipError, NodeMembership, claim_round
from privfer.integrations.flower.private_input import private_input
from privfer.integrations.flower.slots import _arrays_in, _metrics_in, _slots_from_json, round_context
from privfer.secagg import messages as wire
from privfer.secagg.client import SecAggClient
from privfer.secagg.config import SecAggConfig
from privfer.secagg.errors import (
    MalformedMessage,
    RoundAborted,
    WrongRound,
    WrongStage,
)
from privfer.secagg.payload import PayloadLayout

if TYPE_CHECKING:
    from privfer.privacy.node import NodePrivacy


# --------------------------------------------------------------------------------------------------------------------
# Client side: the mod
# --------------------------------------------------------------------------------------------------------------------
def base_type(message_type: str) -> str:
    """Flower routes ``train.anything`` to the ``train`` function: protection goes by the part before the dot."""
    return message_type.split(".", 1)[0]


Privacy = Union["NodePrivacy", Callable[[Context], "NodePrivacy | None"], None]
Membership = Union[NodeMembership, Callable[[Context], "NodeMembership | None"], None]


def make_secagg_mod(
    require: Iterable[str] = ("train", "evaluate"),
    min_clients: int = 3,
    state_ttl: float = 6 * 3600.0,
    privacy: Privacy = None,
    membership: Membership = NodeMembership.from_node_config_of,
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

    ``privacy``: the node's :class:`~privfer.privacy.node.NodePrivacy`
    (or a function of the ``Context`` returning it, e.g. from the node config;
    None: no DP). With it the node takes part only in rounds that come with a
    person-level DP plan it accepts, refuses a round past its lifetime budget
    (kept in its ledger file), and sends its clipped update — or zeros, by its
    secret coin — with its own noise share instead of the weighted delta; no
    example count or metric leaves it (:mod:`privfer.privacy.node`).

    ``membership``: the node's :class:`~privfer.integrations.flower.membership.NodeMembership` (or a function of
    the ``Context``; default: from the node config's ``identity-key``, ``roster-certificate`` and
    ``authority-key``). With it the node takes part only in active-security rounds — signed advertisements and
    the consistency check, its member id from the certificate — and refuses a semi-honest config; without it,
    only in semi-honest rounds.
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
            policy = privacy(ctxt) if callable(privacy) else privacy
            member = membership(ctxt) if callable(membership) else membership
            enrollment = member.enrollment() if member is not None else None
            if stage == "advertise_keys":
                reply = _advertise(record, ctxt, min_clients, policy, member)
            elif stage == "share_keys":
                reply = _share_keys(record, ctxt, min_clients, enrollment)
            elif stage == "masked_input":
                del content[RECORD]  # the ClientApp sees the strategy's message as it was sent
                answer = _masked_input(record, msg, ctxt, call_next, policy, enrollment)
                if isinstance(answer, Message):
                    return answer  # the ClientApp's own error reply
                reply = answer
            elif stage == "consistency":
                reply = _consistency(record, ctxt, min_clients, enrollment)
            elif stage == "unmask":
                reply = _unmask(record, ctxt, min_clients, enrollment)
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


def _save(ctxt: Context, client: SecAggClient, slots: str, weight_key: str, created: float | None = None,
          plan: str = "") -> None:
    ctxt.state.config_records[STATE] = ConfigRecord({"client": client.export_state(), "slots": slots,
                                                     "weight_key": weight_key,
                                                     "created": time.time() if created is None else created,
                                                     "dp": plan})


def _resave(ctxt: Context, client: SecAggClient, saved: ConfigRecord) -> None:
    """Save the client after a stage, with the round's layout, weight key, plan and start time unchanged."""
    _save(ctxt, client, saved["slots"], saved["weight_key"], saved["created"], str(saved.get("dp", "")))


def _at_least(count: int, min_clients: int, what: str) -> None:
    if count < min_clients:
        raise RoundAborted(f"{what} {count} nodes; this node takes part only in sums of at least {min_clients} "
                           "(make_secagg_mod(min_clients=...))")


def _expire(ctxt: Context, ttl: float) -> None:
    saved = ctxt.state.config_records.get(STATE)
    if saved is not None and not time.time() - float(saved.get("created", 0.0)) <= ttl:
        log.info("deleting the keys of an abandoned secure-aggregation round")
        _forget(ctxt)


def _load(ctxt: Context, record: ConfigRecord, enrollment: Any = None) -> tuple[SecAggClient, ConfigRecord]:
    saved = ctxt.state.config_records.get(STATE)
    if saved is None:
        raise WrongStage("this node holds no secure-aggregation round (it missed the first stage, or the round ended)")
    client = SecAggClient.restore(saved["client"], enrollment=enrollment)
    round_id = _field(record, "round", str)
    if client.round_id != round_id:
        raise WrongRound(f"a stage of round {round_id!r} arrived; this node is in round {client.round_id!r}")
    return client, saved


def _forget(ctxt: Context) -> None:
    if STATE in ctxt.state.config_records:
        del ctxt.state[STATE]


def _expect(raw: bytes, kind: type[wire.Message] | tuple[type[wire.Message], ...]) -> Any:
    message = wire.decode(raw)
    if not isinstance(message, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise WrongStage(f"expected {names}, got {type(message).__name__}")
    return message


def _advertise(record: ConfigRecord, ctxt: Context, min_clients: int, policy: "NodePrivacy | None",
               member: NodeMembership | None) -> bytes:
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
    # the node's own policy decides the security of the rounds it joins, never the server's config
    if member is not None:
        member.accept(config)
    elif config.security == "active":
        raise MembershipError("the server asks for active security, but this node has no membership (node config "
                              "identity-key, roster-certificate, authority-key; make_secagg_mod(membership=...))")
    layout = PayloadLayout(tuple(s.shape for s in slots), config)
    plan_json = ""
    if policy is not None:  # this node releases nothing without a DP plan it accepts and a budget left for it
        from privfer.privacy.node import UnacceptablePlan, accept_plan
        from privfer.privacy.node_ledger import NodeLedger

        if record.get(PLAN_FIELD) is None:
            raise UnacceptablePlan("this node takes part only in rounds with a person-level DP plan "
                                   "(SecAggGrid(dp=DistributedDP(...))); the server sent none")
        plan = accept_plan(record.get(PLAN_FIELD), config, layout.update_length, policy)
        if policy.unit == "record" and (not slots or slots[-1].record != COUNT_RECORD or slots[-1].shape != (1,)):
            raise UnacceptablePlan("a record-level round's last array must be the record-count word")
        NodeLedger(policy).check(plan.steps_entry(1))  # refuse early; charged before training
        plan_json = str(record.get(PLAN_FIELD))
    elif record.get("dp") is not None:
        raise WrongStage("the server asks for distributed DP, but this node has no privacy policy "
                         "(make_secagg_mod(privacy=NodePrivacy(...))): it cannot add its noise share")
    round_id = _field(record, "round", str)
    if member is not None:  # its member id is its own, from the certificate; the server learns it from the advert
        enrollment = member.enrollment()
        claim_round(ctxt, round_id)
        client = SecAggClient(enrollment.member, config, round_id, layout, enrollment=enrollment)
    else:
        client = SecAggClient(_field(record, "client_id", int), config, round_id, layout)
    advert = client.advertise_keys().to_bytes()
    _save(ctxt, client, slots_json, _field(record, "weight_key", str), plan=plan_json)
    return advert


def _share_keys(record: ConfigRecord, ctxt: Context, min_clients: int, enrollment: Any) -> bytes:
    client, saved = _load(ctxt, record, enrollment)
    roster = _expect(_field(record, "message", bytes), (wire.KeyRoster, wire.GroupRoster))
    _at_least(roster.advertised if isinstance(roster, wire.GroupRoster) else len(roster.keys), min_clients,
              "the key roster lists")
    answer = client.share_keys(roster).to_bytes()
    _resave(ctxt, client, saved)
    return answer


def _masked_input(record: ConfigRecord, msg: Message, ctxt: Context, call_next: Callable,
                  policy: "NodePrivacy | None", enrollment: Any) -> bytes | Message:
    client, saved = _load(ctxt, record, enrollment)
    forwarded = _expect(_field(record, "message", bytes), wire.ForwardedShares)
    client.check_forwarded(forwarded)  # before training: a replayed or misrouted stage spends no privacy budget
    slots = _slots_from_json(saved["slots"])
    weight_key = saved["weight_key"]
    # record-level DP: the round's last slot is the record count this node adds; the server's message lacks it
    model_slots = slots[:-1] if policy is not None and policy.unit == "record" else slots
    received = _arrays_in(msg.content, model_slots, "the server's message", exact=False)
    plan_json = str(saved.get("dp", ""))
    if bool(plan_json) != (policy is not None):
        raise WrongStage("this round's DP plan and the node's privacy policy disagree (set at the first stage)")
    # everything this node's ClientApp is given, as it received it: the statement it signs under active security
    context = round_context(msg.content, str(saved["slots"]), weight_key, plan_json)
    if policy is not None:
        answer = private_input(client, forwarded, slots, received, msg, ctxt, call_next, policy, plan_json,
                               context)
        _resave(ctxt, client, saved)
        return answer
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
    answer = client.masked_input(forwarded, update, example_count=count, metrics=values, context=context).to_bytes()
    if client.clipping.clipped:
        log.warning("%d of %d values exceeded privfer's clipping range and were clipped", client.clipping.clipped,
                    client.clipping.total)
    _resave(ctxt, client, saved)
    return answer


def _consistency(record: ConfigRecord, ctxt: Context, min_clients: int, enrollment: Any) -> bytes:
    """Active security: check the unmask request and sign this node's statement (once per round)."""
    client, saved = _load(ctxt, record, enrollment)
    request = _expect(_field(record, "message", bytes), wire.UnmaskRequest)
    _at_least(request.included, min_clients, "the unmask request lists as survivors")
    answer = client.check_consistency(request).to_bytes()
    _resave(ctxt, client, saved)
    return answer


def _unmask(record: ConfigRecord, ctxt: Context, min_clients: int, enrollment: Any) -> bytes:
    client, _ = _load(ctxt, record, enrollment)
    if client.config.security == "active":  # the signatures of the survivors: shares only if enough verify
        return client.unmask(_expect(_field(record, "message", bytes), wire.SignatureList)).to_bytes()
    request = _expect(_field(record, "message", bytes), (wire.UnmaskRequest, wire.GroupUnmaskRequest))
    _at_least(request.included, min_clients, "the unmask request lists as survivors")
    return client.unmask(request).to_bytes()
