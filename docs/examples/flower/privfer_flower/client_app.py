"""The ClientApp: one SuperNode = one person, training the VFER on their own clips.

The two lines that make a Flower ClientApp use privfer's secure aggregation are
the import of ``make_secagg_mod`` and ``ClientApp(mods=[make_secagg_mod(...)])``:
the node's update leaves it only masked.

Two mechanisms (run config ``mechanism``):

* ``distributed`` (the default): person-level DP with the noise in the sum.
  The node trains normally; the mod clips its whole update, flips its secret
  participation coin, adds its own Skellam noise share and charges its
  lifetime ledger — a file on the node's own disk (node config ``ledger``,
  ``lifetime-epsilon``, ``delta``), kept across runs and restarts.
* ``local``: record-level DP-SGD with Opacus on the node, each node adding all
  its noise; the mod masks the weighted delta, count and metrics. What
  persists between rounds (``context.state``, never sent): the Opacus
  accountant history.

Under FedPer the personal classifier head stays in ``context.state``.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import replace

import numpy as np
from flwr.client import ClientApp
from flwr.common import ConfigRecord, Context, Message, MetricRecord, RecordDict

from privfer.integrations.flower import make_secagg_mod
from privfer_flower.task import is_distributed, node_privacy

# torch, Opacus and the data load lazily, in train/evaluate: a SuperNode starts a fresh ClientApp process for each
# message, and three of privfer's four secure-aggregation stages need only the mod.

ACCOUNT = "privfer.account"  # the node's accountant history
PERSONAL = "privfer.personal"  # FedPer: the node's own head

app = ClientApp(mods=[make_secagg_mod(privacy=node_privacy)])  # node_privacy: None unless distributed DP
log = logging.getLogger("privfer_flower")


def _account(context: Context) -> tuple[list, float | None]:
    """The node's accountant history and its calibrated noise multiplier, from earlier rounds."""
    if ACCOUNT not in context.state.config_records:
        return [], None
    record = context.state.config_records[ACCOUNT]
    sigma = record.get("noise_multiplier")
    return [tuple(step) for step in json.loads(record["history"])], (float(sigma) if sigma is not None else None)


def _node(context: Context):
    from privfer_flower.task import TRAINING, node_federation

    history, sigma = _account(context)
    fed, actor = node_federation(context.run_config, context.node_config, sigma)
    client, plan = fed.clients[TRAINING][actor], fed.plans[TRAINING][actor]
    # The run config comes with the app the server's operator submits: the node checks what it protects.
    limit = context.node_config.get("max-epsilon")  # the node operator's own ceiling, whatever the run asks
    if limit is not None and not (fed.private and fed.config.privacy.epsilon <= float(limit)):
        asked = fed.config.privacy.epsilon if fed.private else "no DP"
        raise PermissionError(f"the run asks for epsilon {asked}; this node trains only with epsilon <= {limit}")
    if fed.private:
        ceiling = min(float(context.node_config.get("max-delta", 1.0)), 1.0 / client.records)
        if not fed.delta < ceiling:  # delta >= 1/records would allow releasing a record outright
            raise PermissionError(f"the run asks for delta {fed.delta:.3g}; this node trains only with delta < "
                                  f"{ceiling:.3g} (1/records, or its max-delta)")
    return fed, actor, client, plan, history


def _personal(fed, context: Context, shared: list[str]) -> dict:
    from privfer_flower.task import from_record, initial_state

    if PERSONAL in context.state.array_records:
        return from_record(context.state.array_records[PERSONAL])
    return {name: value for name, value in initial_state(fed.config, fed.feature_dim).items() if name not in shared}


def _train_distributed(msg: Message, context: Context) -> Message:
    """Person level: plain local training; secagg_mod clips the update and adds this node's noise share."""
    from privfer.fl.mechanisms import local_training
    from privfer.fl.rounds import TRAINING
    from privfer_flower.task import from_record, node_federation, shared_names, to_record

    fed, actor = node_federation(context.run_config, context.node_config)
    config, client = fed.config, fed.clients[TRAINING][actor]
    shared = shared_names(config, fed.feature_dim)
    received = from_record(msg.content["arrays"])
    if sorted(received) != sorted(shared):
        raise ValueError(f"the server sent {sorted(received)[:4]}..., this node shares {sorted(shared)[:4]}...")
    update = client.fit(config, {**received, **_personal(fed, context, shared)}, shared,
                        local_training(config, TRAINING, None), seed=secrets.randbits(63))
    if update.personal:  # the strategy's personal layers stay on this node
        context.state.array_records[PERSONAL] = to_record(update.personal, sorted(update.personal))
    trained = {name: received[name] + update.delta[name] for name in shared}
    # the count is for the ClientApp contract only: under distributed DP the mod sends no count or metric
    return Message(RecordDict({"arrays": to_record(trained, shared),
                               "metrics": MetricRecord({"num-examples": update.examples})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_distributed(context.run_config):
        return _train_distributed(msg, context)
    from privfer.fl.mechanisms import local_training, public_client_seed
    from privfer.fl.rounds import TRAINING
    from privfer.privacy.calibrate import epsilon_spent
    from privfer_flower.task import from_record, shared_names, to_record

    fed, actor, client, plan, history = _node(context)
    config = fed.config
    shared = shared_names(config, fed.feature_dim)
    received = from_record(msg.content["arrays"])
    if sorted(received) != sorted(shared):
        raise ValueError(f"the server sent {sorted(received)[:4]}..., this {config.federation.strategy} node shares "
                         f"{sorted(shared)[:4]}...")
    if fed.private:
        # the budget is checked on what this round would add to what the node has spent, whatever the rounds
        # count, sample rate or noise of earlier rounds were
        per_round = config.federation.local_epochs * plan.steps_per_epoch
        after = epsilon_spent([*history, (plan.noise_multiplier, plan.sample_rate, per_round)], fed.delta,
                              config.privacy.accountant)
        if after > config.privacy.epsilon + 1e-9:
            raise PermissionError(f"another round would spend epsilon {after:.3f}, above this node's budget "
                                  f"{config.privacy.epsilon:g}")
    server_round = int(msg.content["config"]["server-round"])
    # DP noise and Poisson sampling must be unpredictable to the server: a fresh OS seed every round in a private
    # run, whatever privacy.noise_source the run config asks for (run_seed would make the noise computable by
    # whoever knows the config). Without DP, privfer simulate's seed: the two then train identically.
    seed = secrets.randbits(63) if fed.private else public_client_seed(config, TRAINING, server_round, actor)
    update = client.fit(
        config,
        {**received, **_personal(fed, context, shared)},
        shared,
        # never run_seed, see above
        replace(local_training(config, TRAINING, plan.noise_multiplier),
                noise_source="os" if config.privacy.noise_source == "os" else "run_key"),
        history=history,
        seed=seed,
    )
    account = {"history": json.dumps(update.history)}
    if plan.noise_multiplier is not None:
        account["noise_multiplier"] = plan.noise_multiplier
    context.state.config_records[ACCOUNT] = ConfigRecord(account)
    if update.personal:  # the strategy's personal layers stay on this node
        context.state.array_records[PERSONAL] = to_record(update.personal, sorted(update.personal))
    trained = {name: received[name] + update.delta[name] for name in shared}
    metrics = {"num-examples": fed.strategy.client_weight(update.examples)}
    if not fed.private:
        metrics["train-loss"] = update.loss  # a private run releases no loss: it is not DP-protected
    else:  # the node's own view of its budget, for its log; never sent
        spent = epsilon_spent(update.history, fed.delta, config.privacy.accountant)
        log.info("actor %d, round %d: epsilon spent %.3f of %g", actor, server_round, spent, config.privacy.epsilon)
    return Message(RecordDict({"arrays": to_record(trained, shared), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """FedPer without DP: accuracy of the node's personalized model on its own clips (securely averaged).

    A private run releases no accuracy: it is computed on the node's clips without DP noise (the same reason it
    releases no training loss).
    """
    from privfer.evaluation import predict
    from privfer.models.vfer import VFER
    from privfer_flower.task import from_record, shared_names

    if is_distributed(context.run_config):
        raise PermissionError("a private run releases no accuracy on a node's own clips (not DP-protected)")
    fed, _, client, _, _ = _node(context)
    if fed.private:
        raise PermissionError("a private run releases no accuracy on a node's own clips (not DP-protected)")
    shared = shared_names(fed.config, fed.feature_dim)
    state = {**from_record(msg.content["arrays"]), **_personal(fed, context, shared)}
    model = VFER.from_config(fed.config.model, fed.feature_dim, private=fed.private)
    model.load_state_dict(state)
    predicted = predict(model, client.features.numpy()).argmax(axis=1)
    targets = client.targets
    truth = (targets.argmax(dim=1) if targets.ndim == 2 else targets).numpy()
    accuracy = float(np.mean(predicted == truth))
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": client.records, "accuracy": accuracy})}),
                   reply_to=msg)
