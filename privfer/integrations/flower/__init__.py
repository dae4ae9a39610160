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

Person-level distributed DP: ``SecAggGrid(grid, dp=DistributedDP(...))`` on the
server and ``make_secagg_mod(privacy=NodePrivacy(...))`` on each node; every
node adds its own noise share and keeps its lifetime ledger on its own disk
(:mod:`privfer.privacy.node`, framework-neutral).

:class:`LocalGrid` runs a ``ClientApp`` for several nodes in this process —
each with a persistent ``Context`` that is serialized between messages like a
SuperNode's — for tests, benchmarks and notebooks.
"""

from __future__ import annotations

# common first: it holds the guard that raises a clear ImportError when flwr is not installed
from privfer.integrations.flower.common import DEFAULTS as DEFAULTS
from privfer.integrations.flower.common import RECORD, STATE, UnprotectedMessage
from privfer.integrations.flower.common import log as log
from privfer.integrations.flower.grid import RoundReport, SecAggGrid
from privfer.integrations.flower.local import LocalGrid
from privfer.integrations.flower.mod import base_type as base_type
from privfer.integrations.flower.mod import make_secagg_mod, secagg_mod
from privfer.integrations.flower.slots import ArraySlot as ArraySlot
from privfer.integrations.flower.slots import slots_of as slots_of
from privfer.privacy.node import BudgetExhausted, DistributedDP, NodeLedgerError, NodePrivacy, UnacceptablePlan
from privfer.privacy.node_ledger import NodeLedger

__all__ = ["BudgetExhausted", "DistributedDP", "LocalGrid", "NodeLedger", "NodeLedgerError", "NodePrivacy", "RECORD",
           "RoundReport", "STATE", "SecAggGrid", "UnacceptablePlan", "UnprotectedMessage", "make_secagg_mod",
           "secagg_mod"]
