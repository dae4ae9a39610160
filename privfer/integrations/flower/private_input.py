"""A Flower node's input under distributed DP (person or record level): what ``secagg_mod`` sends instead of the
plain weighted update when the node has a privacy policy.

The node accepts the server's plan only if it fits its own policy
(:func:`privfer.privacy.node.accept_plan`), charges the round to its lifetime
ledger before its ``ClientApp`` trains, and sends only integers: its clipped
update (or zeros, by its secret coin) or its clipped gradient sum with its
record count, rounded, plus its noise share. After training, any failure is one
fixed text to the server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from privfer.integrations.flower.common import ConfigRecord, Context, Message, log
from privfer.integrations.flower.slots import _arrays_in, _metrics_in
from privfer.secagg.client import SecAggClient

if TYPE_CHECKING:
    from privfer.privacy.node import NodePrivacy


def private_input(client: SecAggClient, forwarded: Any, slots: list, received: list, msg: Message, ctxt: Context,
                  call_next: Callable, policy: "NodePrivacy", plan_json: str, context: bytes) -> bytes:
    """This node's masked input under distributed DP: the plan accepted, the round charged to the node's ledger
    (before training), then train whatever the coin will say, clip, coin or encode, add the noise share. Returns
    the masked input's bytes; the caller saves the client's state."""
    import numpy as np

    from privfer.privacy.person import person_contribution, secret_coin
    from privfer.privacy.node import NodePrivacyError, accept_plan
    from privfer.privacy.node_ledger import NodeLedger
    from privfer.privacy.distributed import noise_generator

    plan = accept_plan(plan_json, client.config, client.layout.update_length, policy)
    ledger = NodeLedger(policy)
    # Charged BEFORE training (under the ledger's lock): whatever happens after — the ClientApp failing, an input
    # refused — may depend on the data, so it is paid for; a round past the budget is refused here, costing nothing.
    epsilon = ledger.charge(plan.steps_entry(1), client.round_id)
    log.info("distributed DP (%s level): this node has now spent epsilon %.3f of its lifetime %g", policy.unit,
             epsilon, ledger.lifetime)
    record_level = policy.unit == "record"
    if record_level:  # the ClientApp samples (rate q) and clips (bound C) per example: it is told both
        model_slots = slots[:-1]  # the last slot is the record count, added here
        config = msg.content.config_records.get("config")
        if config is None:
            msg.content["config"] = config = ConfigRecord()
        config[DP_CLIP_KEY] = float(plan.max_grad_norm)
        config[DP_RATE_KEY] = float(plan.sample_rate)
    else:
        model_slots = slots
    try:
        reply = call_next(msg, ctxt)  # constant work: the node trains whatever its coin will say
        if reply.has_error():
            raise ValueError("the ClientApp replied with an error")
        local = _arrays_in(reply.content, model_slots, "the ClientApp's reply")
        rng = noise_generator()  # ChaCha20 keyed by the OS CSPRNG: the coin and the share, unknown to the server
        if record_level:
            contribution = _record_contribution(local, reply, plan, rng)
        else:
            update = np.concatenate([(after - before).ravel() for after, before in zip(local, received)])
            contribution = person_contribution(update, secret_coin(rng, plan.sample_rate), plan, rng)
        arrays, at = [], 0
        for slot in slots:
            size = int(np.prod(slot.shape, dtype=np.int64))
            arrays.append(contribution[at : at + size].reshape(slot.shape))
            at += size
        return client.masked_input(forwarded, arrays, context=context).to_bytes()  # the integers alone
    except Exception as exc:  # noqa: BLE001 - after training, a failure's text could tell the data (or the coin)
        log.warning("this node sends nothing this round (%s); the round is paid for", exc.__class__.__name__)
        raise NodePrivacyError("this node's contribution failed after training; it sends nothing this round "
                               "(details in the node's log)") from None


DP_CLIP_KEY, DP_RATE_KEY = "privfer-dp-max-grad-norm", "privfer-dp-sample-rate"  # record level, to the ClientApp
RECORDS_KEY = "privfer-records"  # record level: the ClientApp's TOTAL record count (never the sampled one)


def _record_contribution(sums: list, reply: Message, plan: Any, rng: Any) -> Any:
    """Record level: the ClientApp's clipped gradient sum, rounded with this node's noise share, and its total
    record count as the last word, exact (counts are public under record-level DP, as in privfer simulate's
    ledger: the server divides by sample_rate x the included records). The count comes from a key the node's
    code fixes (``privfer-records``), never one the server names."""
    import numpy as np

    from privfer.privacy.distributed import encode_contribution

    records = _metrics_in(reply.content).get(RECORDS_KEY)
    if isinstance(records, bool) or not isinstance(records, (int, float)) or records != int(records) \
            or not 1 <= records <= plan.records:
        raise ValueError(f"the ClientApp's reply must give its total record count as {RECORDS_KEY!r}")
    flat = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in sums])
    bound = plan.max_grad_norm * int(records)
    if not np.all(np.isfinite(flat)) or float(np.linalg.norm(flat)) > bound * (1 + 1e-6):
        # a sum of n gradients each clipped to C has norm <= n C: anything else was not clipped per example
        raise ValueError("the ClientApp's gradient sum is above records x C: it was not clipped per example")
    return np.append(encode_contribution(flat, plan, rng), np.int64(records))


__all__ = ["DP_CLIP_KEY", "DP_RATE_KEY", "RECORDS_KEY", "private_input"]
